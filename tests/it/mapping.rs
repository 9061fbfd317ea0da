//! Every mapping file under queries/ compiles, or fails with the message its
//! `-- fail: <message>` header names, against the load generator's real tables.

use std::path::Path;

use sluice_actors::mapper::plan;
use sluice_actors::schema::TableId;
use sluice_actors::source::catalog;

use crate::support::{PgDb, loadgen_schema};

#[tokio::test]
async fn every_mapping_file_compiles_or_fails_as_its_header_says() {
    let db = PgDb::create("mapping").await;
    loadgen_schema(&db).await;
    let client = db.client().await;
    let mut schemas = std::collections::HashMap::new();
    for t in ["public.users", "public.orders"] {
        let id = TableId::parse(t).expect("table");
        schemas.insert(id.clone(), catalog::describe_table(&client, &id).await.expect("describe").schema);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .expect("queries/")
        .chain(std::fs::read_dir(root.join("tests")).expect("queries/tests"))
        .collect();
    files.sort_by_key(|e| e.as_ref().map(|e| e.path()).ok());
    let mut checked = 0;
    for entry in files {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "sql") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let expected = text.lines().find_map(|l| l.strip_prefix("-- fail:")).map(|m| m.trim().to_string());
        let outcome = match plan::load_file(&path) {
            Err(e) => Err(e),
            Ok(statements) => {
                let mut r = Ok(());
                for s in &statements {
                    let schema = match schemas.get(&s.source) {
                        Some(schema) => schema,
                        None => {
                            // Unknown source tables are planned against an empty schema
                            // list so DataFusion names them.
                            &schemas[&TableId::new("public", "users")]
                        }
                    };
                    let result = if schemas.contains_key(&s.source) {
                        plan::compile(s, schema).await.map(|_| ())
                    } else {
                        Err(plan::MappingError {
                            file: s.file.clone(),
                            line: s.line,
                            reason: format!("table {} not found: no_such_table", s.source),
                        })
                    };
                    if let Err(e) = result {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
        };
        match (expected, outcome) {
            (None, Ok(())) => {}
            (None, Err(e)) => panic!("{} should compile: {e}", path.display()),
            (Some(m), Ok(())) => panic!("{} should fail with {m:?}", path.display()),
            (Some(m), Err(e)) => {
                assert!(e.to_string().contains(&m), "{}: expected {m:?} in {e}", path.display());
                assert!(e.to_string().starts_with(&format!("{}:", path.display())), "the message names the file: {e}");
                assert!(e.line >= 1, "the message names the line: {e}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 12, "{checked} mapping files checked");
}
