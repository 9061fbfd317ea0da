//! Table schemas and the type mapping between PostgreSQL, Arrow and the sinks.
//!
//! A [`TableSchema`] is immutable and shared (`Arc`): a schema change at the source makes a
//! new value with a higher `version`, which travels in-band before the first row that uses
//! it. Every column knows its PostgreSQL type ([`PgType`]) and from it its Arrow type; the
//! PostgreSQL type name travels in the Arrow field metadata (`sluice.pg_type`) so sinks can
//! create `jsonb`/`uuid` columns where Arrow alone only says `Utf8`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, IntervalUnit, Schema, SchemaRef, TimeUnit};

/// Arrow field metadata key holding the source PostgreSQL type name.
pub const PG_TYPE_METADATA: &str = "sluice.pg_type";

/// A table, as `schema.name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct TableId {
    pub schema: String,
    pub name: String,
}

impl TableId {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self { schema: schema.into(), name: name.into() }
    }

    /// Parses `schema.table` or `table` (schema `public`).
    pub fn parse(qualified: &str) -> Option<Self> {
        let mut parts = qualified.split('.');
        let (schema, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => ("public", name),
            (Some(schema), Some(name), None) => (schema, name),
            _ => return None,
        };
        if schema.is_empty() || name.is_empty() {
            return None;
        }
        Some(Self::new(schema, name))
    }

    /// The identifier quoted for PostgreSQL (`"schema"."name"`).
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes a PostgreSQL identifier.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a PostgreSQL string literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// What the source sends as the old image of updates and deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReplicaIdentity {
    /// Primary-key columns only.
    Default,
    /// Every column.
    Full,
    /// The columns of a chosen unique index.
    Index,
    /// Nothing: updates and deletes cannot be replicated.
    Nothing,
}

impl ReplicaIdentity {
    /// From `pg_class.relreplident` / the pgoutput Relation message byte.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            b'd' => Some(Self::Default),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            b'n' => Some(Self::Nothing),
            _ => None,
        }
    }
}

/// The PostgreSQL types sluice decodes; everything else is carried as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `numeric(precision, scale)`; `None` when unbounded.
    Numeric(Option<(u8, i8)>),
    /// text, varchar, bpchar, name, enums and any type without a dedicated decoder;
    /// the string is the type's name as `format_type` prints it.
    Text(String),
    Json,
    Jsonb,
    Bytea,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Interval,
    Uuid,
    Array(Box<PgType>),
}

/// Built-in type OIDs (`pg_type.oid`), stable across PostgreSQL versions.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

impl PgType {
    /// The type of a built-in OID with its type modifier; `None` for OIDs that need the
    /// catalog (enums, domains, arrays of those, extension types).
    pub fn from_oid(type_oid: u32, typmod: i32) -> Option<Self> {
        use oid::*;
        let scalar = |o: u32| -> Option<PgType> {
            Some(match o {
                BOOL => PgType::Bool,
                BYTEA => PgType::Bytea,
                INT8 => PgType::Int8,
                INT2 => PgType::Int2,
                INT4 | OID => PgType::Int4,
                TEXT => PgType::Text("text".into()),
                CHAR => PgType::Text("\"char\"".into()),
                NAME => PgType::Text("name".into()),
                BPCHAR => PgType::Text("bpchar".into()),
                VARCHAR => PgType::Text("varchar".into()),
                JSON => PgType::Json,
                JSONB => PgType::Jsonb,
                FLOAT4 => PgType::Float4,
                FLOAT8 => PgType::Float8,
                DATE => PgType::Date,
                TIME => PgType::Time,
                TIMESTAMP => PgType::Timestamp,
                TIMESTAMPTZ => PgType::TimestampTz,
                INTERVAL => PgType::Interval,
                NUMERIC => PgType::Numeric(None),
                UUID => PgType::Uuid,
                _ => return None,
            })
        };
        let array_elem = match type_oid {
            1000 => Some(BOOL),
            1001 => Some(BYTEA),
            1002 => Some(CHAR),
            1003 => Some(NAME),
            1005 => Some(INT2),
            1007 => Some(INT4),
            1009 => Some(TEXT),
            1014 => Some(BPCHAR),
            1015 => Some(VARCHAR),
            1016 => Some(INT8),
            1021 => Some(FLOAT4),
            1022 => Some(FLOAT8),
            1115 => Some(TIMESTAMP),
            1182 => Some(DATE),
            1183 => Some(TIME),
            1185 => Some(TIMESTAMPTZ),
            1187 => Some(INTERVAL),
            1231 => Some(NUMERIC),
            2951 => Some(UUID),
            199 => Some(JSON),
            3807 => Some(JSONB),
            _ => None,
        };
        if let Some(elem) = array_elem {
            return scalar(elem).map(|t| PgType::Array(Box::new(t)));
        }
        let t = scalar(type_oid)?;
        Some(match t {
            PgType::Numeric(_) => PgType::Numeric(numeric_typmod(typmod)),
            other => other,
        })
    }

    /// Parses the name `format_type()` prints (`numeric(12,2)`, `timestamp with time zone`,
    /// `integer[]`, `character varying(40)`...). Unknown names are text.
    pub fn from_type_name(name: &str) -> Self {
        let name = name.trim();
        if let Some(elem) = name.strip_suffix("[]") {
            return PgType::Array(Box::new(Self::from_type_name(elem)));
        }
        let base = name.split('(').next().unwrap_or(name).trim();
        match base {
            "boolean" | "bool" => PgType::Bool,
            "smallint" | "int2" => PgType::Int2,
            "integer" | "int" | "int4" | "oid" => PgType::Int4,
            "bigint" | "int8" => PgType::Int8,
            "real" | "float4" => PgType::Float4,
            "double precision" | "float8" => PgType::Float8,
            "numeric" | "decimal" => {
                let args = name.split_once('(').map(|(_, rest)| rest.trim_end_matches(')'));
                let parsed = args.and_then(|a| {
                    let mut it = a.split(',').map(|p| p.trim().parse::<i32>());
                    let p = it.next()?.ok()?;
                    let s = it.next().unwrap_or(Ok(0)).ok()?;
                    Some((u8::try_from(p).ok()?, i8::try_from(s).ok()?))
                });
                PgType::Numeric(parsed)
            }
            "json" => PgType::Json,
            "jsonb" => PgType::Jsonb,
            "bytea" => PgType::Bytea,
            "date" => PgType::Date,
            "time" | "time without time zone" => PgType::Time,
            "timestamp" | "timestamp without time zone" => PgType::Timestamp,
            "timestamptz" | "timestamp with time zone" => PgType::TimestampTz,
            "interval" => PgType::Interval,
            "uuid" => PgType::Uuid,
            _ => PgType::Text(name.to_string()),
        }
    }

    /// The name PostgreSQL prints for this type (`format_type` style).
    pub fn name(&self) -> String {
        match self {
            PgType::Bool => "boolean".into(),
            PgType::Int2 => "smallint".into(),
            PgType::Int4 => "integer".into(),
            PgType::Int8 => "bigint".into(),
            PgType::Float4 => "real".into(),
            PgType::Float8 => "double precision".into(),
            PgType::Numeric(None) => "numeric".into(),
            PgType::Numeric(Some((p, s))) => format!("numeric({p},{s})"),
            PgType::Text(name) => name.clone(),
            PgType::Json => "json".into(),
            PgType::Jsonb => "jsonb".into(),
            PgType::Bytea => "bytea".into(),
            PgType::Date => "date".into(),
            PgType::Time => "time without time zone".into(),
            PgType::Timestamp => "timestamp without time zone".into(),
            PgType::TimestampTz => "timestamp with time zone".into(),
            PgType::Interval => "interval".into(),
            PgType::Uuid => "uuid".into(),
            PgType::Array(elem) => format!("{}[]", elem.name()),
        }
    }

    /// The Arrow type values of this PostgreSQL type are carried as (DESIGN.md type table).
    pub fn arrow_type(&self) -> DataType {
        match self {
            PgType::Bool => DataType::Boolean,
            PgType::Int2 => DataType::Int16,
            PgType::Int4 => DataType::Int32,
            PgType::Int8 => DataType::Int64,
            PgType::Float4 => DataType::Float32,
            PgType::Float8 => DataType::Float64,
            PgType::Numeric(Some((p, s))) if *p <= 38 && *p > 0 => DataType::Decimal128(*p, *s),
            PgType::Numeric(_) => DataType::Utf8,
            PgType::Text(_) | PgType::Json | PgType::Jsonb | PgType::Uuid => DataType::Utf8,
            PgType::Bytea => DataType::Binary,
            PgType::Date => DataType::Date32,
            PgType::Time => DataType::Time64(TimeUnit::Microsecond),
            PgType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            PgType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            PgType::Interval => DataType::Interval(IntervalUnit::MonthDayNano),
            PgType::Array(elem) => DataType::List(Arc::new(Field::new("item", elem.arrow_type(), true))),
        }
    }
}

/// Decodes a `numeric` type modifier into (precision, scale).
pub fn numeric_typmod(typmod: i32) -> Option<(u8, i8)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4;
    let precision = (t >> 16) & 0xffff;
    // The scale is an 11-bit signed field since PostgreSQL 15.
    let scale = ((t & 0x7ff) ^ 1024) - 1024;
    Some((u8::try_from(precision).ok()?, i8::try_from(scale).ok()?))
}

/// One column of a source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub pg_type: PgType,
    pub nullable: bool,
    /// Part of the primary key (or of the replica identity for tables without one).
    pub key: bool,
}

/// The schema of a source table at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub id: TableId,
    /// Increases by one at each change seen in the stream; starts at 1.
    pub version: u32,
    pub columns: Vec<Column>,
    pub replica_identity: ReplicaIdentity,
}

impl TableSchema {
    /// Indexes of the key columns, in column order.
    pub fn key_indexes(&self) -> Vec<usize> {
        self.columns.iter().enumerate().filter(|(_, c)| c.key).map(|(i, _)| i).collect()
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The Arrow schema of this table's rows, with the PostgreSQL type in each field's metadata.
    pub fn arrow_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| {
                Field::new(&c.name, c.pg_type.arrow_type(), true)
                    .with_metadata(HashMap::from([(PG_TYPE_METADATA.to_string(), c.pg_type.name())]))
            })
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// Whether two versions describe the same columns (names, types, keys).
    pub fn same_shape(&self, other: &TableSchema) -> bool {
        self.id == other.id && self.columns == other.columns && self.replica_identity == other.replica_identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_typmod_decodes_precision_and_scale() {
        // numeric(12,2): ((12 << 16) | 2) + 4
        assert_eq!(numeric_typmod((12 << 16 | 2) + 4), Some((12, 2)));
        assert_eq!(numeric_typmod(-1), None);
        // numeric(5,-2), allowed since PostgreSQL 15
        assert_eq!(numeric_typmod((5 << 16 | (0x7ff & -2i32)) + 4), Some((5, -2)));
    }

    #[test]
    fn type_names_round_trip() {
        for name in [
            "boolean",
            "smallint",
            "integer",
            "bigint",
            "real",
            "double precision",
            "numeric",
            "numeric(12,2)",
            "jsonb",
            "json",
            "bytea",
            "date",
            "time without time zone",
            "timestamp without time zone",
            "timestamp with time zone",
            "interval",
            "uuid",
            "integer[]",
            "text[]",
        ] {
            assert_eq!(PgType::from_type_name(name).name(), name, "{name}");
        }
        assert_eq!(PgType::from_type_name("character varying(40)"), PgType::Text("character varying(40)".into()));
        assert_eq!(PgType::from_type_name("mood"), PgType::Text("mood".into()));
    }

    #[test]
    fn builtin_oids_map_to_types() {
        assert_eq!(PgType::from_oid(oid::INT4, -1), Some(PgType::Int4));
        assert_eq!(PgType::from_oid(1007, -1), Some(PgType::Array(Box::new(PgType::Int4))));
        assert_eq!(PgType::from_oid(oid::NUMERIC, (10 << 16 | 3) + 4), Some(PgType::Numeric(Some((10, 3)))));
        assert_eq!(PgType::from_oid(999_999, -1), None);
    }

    #[test]
    fn arrow_types_follow_the_design_table() {
        assert_eq!(PgType::Numeric(Some((12, 2))).arrow_type(), DataType::Decimal128(12, 2));
        assert_eq!(PgType::Numeric(None).arrow_type(), DataType::Utf8);
        assert_eq!(PgType::TimestampTz.arrow_type(), DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())));
        assert_eq!(PgType::Uuid.arrow_type(), DataType::Utf8);
    }

    #[test]
    fn table_ids_parse() {
        assert_eq!(TableId::parse("public.users"), Some(TableId::new("public", "users")));
        assert_eq!(TableId::parse("users"), Some(TableId::new("public", "users")));
        assert_eq!(TableId::parse("a.b.c"), None);
        assert_eq!(TableId::parse(".x"), None);
        assert_eq!(TableId::new("s", "we\"ird").quoted(), "\"s\".\"we\"\"ird\"");
    }
}
