//! Decoder of PostgreSQL's `pgoutput` logical replication messages (protocol version 1).
//!
//! Pure: bytes in, [`Message`] out. Every length is checked before it is read, so truncated
//! or malformed input is a [`ProtocolError`], never a panic (a property test feeds it random
//! and mutated bytes). Tuple values stay raw ([`TupleValue`]); turning them into typed values
//! needs the relation's column types, which [`decode_tuple`] applies.
//!
//! Layout reference: PostgreSQL docs, "Logical Replication Message Formats".

use bytes::Bytes;

use crate::pgtext;
use crate::schema::{PgType, ReplicaIdentity};
use crate::value::Value;

/// A pgoutput message that is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput {message} message: {reason}")]
pub struct ProtocolError {
    pub message: &'static str,
    pub reason: String,
}

/// A column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key sent with updates and deletes).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The description of a table, sent before its first change and after each schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// One column value of a tuple, undecoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// An unchanged TOASTed value that was not sent.
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

/// Which old image an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldImage {
    /// `K`: the replica identity key columns (others are null).
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin { final_lsn: u64, commit_time: i64, xid: u32 },
    Commit { flags: u8, commit_lsn: u64, end_lsn: u64, commit_time: i64 },
    Origin { lsn: u64, name: String },
    Relation(Relation),
    Type { oid: u32, namespace: String, name: String },
    Insert { relation: u32, new: Vec<TupleValue> },
    Update { relation: u32, old: Option<(OldImage, Vec<TupleValue>)>, new: Vec<TupleValue> },
    Delete { relation: u32, old: (OldImage, Vec<TupleValue>) },
    Truncate { relations: Vec<u32>, cascade: bool, restart_identity: bool },
    Message { transactional: bool, lsn: u64, prefix: String, content: Bytes },
}

struct Reader {
    buf: Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader {
    fn fail(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError { message: self.message, reason: reason.into() }
    }

    fn take(&mut self, n: usize) -> Result<Bytes, ProtocolError> {
        if self.buf.len() - self.pos < n {
            return Err(self.fail(format!(
                "needs {n} more bytes at offset {}, has {}",
                self.pos,
                self.buf.len() - self.pos
            )));
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(self.i32()? as u32)
    }

    fn i64(&mut self) -> Result<i64, ProtocolError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(i64::from_be_bytes(a))
    }

    fn string(&mut self) -> Result<String, ProtocolError> {
        let rest = &self.buf[self.pos..];
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| self.fail("unterminated string"))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| self.fail("string is not UTF-8"))?.to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, ProtocolError> {
        let n = self.i16()?;
        if n < 0 {
            return Err(self.fail(format!("negative column count {n}")));
        }
        // Each column takes at least one byte: refuse counts the buffer cannot hold.
        if n as usize > self.buf.len() - self.pos {
            return Err(self.fail(format!("column count {n} exceeds the message")));
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(self.fail(format!("negative value length {len}")));
                    }
                    let data = self.take(len as usize)?;
                    if kind == b't' { TupleValue::Text(data) } else { TupleValue::Binary(data) }
                }
                other => return Err(self.fail(format!("unknown tuple value kind {:?}", other as char))),
            });
        }
        Ok(out)
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        if self.pos != self.buf.len() {
            return Err(self.fail(format!("{} trailing bytes", self.buf.len() - self.pos)));
        }
        Ok(())
    }
}

/// Decodes one pgoutput message (the payload of one XLogData frame).
pub fn decode(data: Bytes) -> Result<Message, ProtocolError> {
    let Some(&tag) = data.first() else {
        return Err(ProtocolError { message: "empty", reason: "no message tag".into() });
    };
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        other => {
            return Err(ProtocolError {
                message: "unknown",
                reason: format!("unknown message tag {:?}", other as char),
            });
        }
    };
    let mut r = Reader { buf: data, pos: 1, message };
    let out = match tag {
        b'B' => Message::Begin { final_lsn: r.i64()? as u64, commit_time: r.i64()?, xid: r.u32()? },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.i64()? as u64,
            end_lsn: r.i64()? as u64,
            commit_time: r.i64()?,
        },
        b'O' => Message::Origin { lsn: r.i64()? as u64, name: r.string()? },
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let identity_code = r.u8()?;
            let replica_identity = ReplicaIdentity::from_code(identity_code)
                .ok_or_else(|| r.fail(format!("unknown replica identity {:?}", identity_code as char)))?;
            let n = r.i16()?;
            if n < 0 {
                return Err(r.fail(format!("negative column count {n}")));
            }
            let mut columns = Vec::with_capacity((n as usize).min(1600));
            for _ in 0..n {
                columns.push(RelationColumn {
                    key: r.u8()? & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation { oid, namespace, name, replica_identity, columns })
        }
        b'Y' => Message::Type { oid: r.u32()?, namespace: r.string()?, name: r.string()? },
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert { relation, new: r.tuple()? },
                other => return Err(r.fail(format!("expected 'N', got {:?}", other as char))),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut marker = r.u8()?;
            if marker == b'K' || marker == b'O' {
                let kind = if marker == b'K' { OldImage::Key } else { OldImage::Full };
                old = Some((kind, r.tuple()?));
                marker = r.u8()?;
            }
            if marker != b'N' {
                return Err(r.fail(format!("expected 'N', got {:?}", marker as char)));
            }
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = match r.u8()? {
                b'K' => OldImage::Key,
                b'O' => OldImage::Full,
                other => return Err(r.fail(format!("expected 'K' or 'O', got {:?}", other as char))),
            };
            Message::Delete { relation, old: (kind, r.tuple()?) }
        }
        b'T' => {
            let n = r.i32()?;
            if n < 0 || n as usize > (r.buf.len() - r.pos) / 4 + 1 {
                return Err(r.fail(format!("bad relation count {n}")));
            }
            let options = r.u8()?;
            let relations = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            Message::Truncate { relations, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.i64()? as u64;
            let prefix = r.string()?;
            let len = r.i32()?;
            if len < 0 {
                return Err(r.fail("negative content length"));
            }
            Message::Message { transactional, lsn, prefix, content: r.take(len as usize)? }
        }
        _ => unreachable!("tag checked above"),
    };
    r.finish()?;
    Ok(out)
}

/// A tuple value that does not fit its column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TupleError {
    #[error("tuple has {got} columns, relation has {expected}")]
    Width { expected: usize, got: usize },
    #[error("column {column}: {source}")]
    Value { column: String, source: pgtext::DecodeError },
    #[error("column {column}: binary values are not requested, got one")]
    Binary { column: String },
    #[error("column {column}: value is not UTF-8")]
    Utf8 { column: String },
}

/// Decodes a tuple's text values with the columns' types.
pub fn decode_tuple<'a>(
    columns: impl ExactSizeIterator<Item = (&'a str, &'a PgType)>,
    tuple: &[TupleValue],
) -> Result<Vec<Value>, TupleError> {
    if columns.len() != tuple.len() {
        return Err(TupleError::Width { expected: columns.len(), got: tuple.len() });
    }
    columns
        .zip(tuple)
        .map(|((name, ty), v)| match v {
            TupleValue::Null => Ok(Value::Null),
            TupleValue::Unchanged => Ok(Value::Unchanged),
            TupleValue::Text(b) => {
                let s = std::str::from_utf8(b).map_err(|_| TupleError::Utf8 { column: name.to_string() })?;
                pgtext::decode(ty, s).map_err(|source| TupleError::Value { column: name.to_string(), source })
            }
            TupleValue::Binary(_) => Err(TupleError::Binary { column: name.to_string() }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds pgoutput bytes the way the server lays them out.
    #[derive(Default)]
    struct Enc(Vec<u8>);

    impl Enc {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend(v.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, v: &str) -> Self {
            let mut e = self.u8(b't').i32(v.len() as i32);
            e.0.extend(v.as_bytes());
            e
        }
        fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn relation_bytes() -> Bytes {
        Enc::default()
            .u8(b'R')
            .i32(16384)
            .s("public")
            .s("users")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .s("id")
            .i32(23)
            .i32(-1)
            .u8(0)
            .s("name")
            .i32(25)
            .i32(-1)
            .bytes()
    }

    #[test]
    fn relation_decodes() {
        let Message::Relation(rel) = decode(relation_bytes()).unwrap() else { panic!() };
        assert_eq!(rel.oid, 16384);
        assert_eq!((rel.namespace.as_str(), rel.name.as_str()), ("public", "users"));
        assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].type_oid, 25);
    }

    #[test]
    fn insert_update_delete_decode() {
        let insert = Enc::default().u8(b'I').i32(7).u8(b'N').i16(3).text("1").u8(b'n').u8(b'u').bytes();
        assert_eq!(
            decode(insert).unwrap(),
            Message::Insert {
                relation: 7,
                new: vec![TupleValue::Text(Bytes::from_static(b"1")), TupleValue::Null, TupleValue::Unchanged]
            }
        );
        let update = Enc::default().u8(b'U').i32(7).u8(b'K').i16(1).text("1").u8(b'N').i16(1).text("2").bytes();
        let Message::Update { old: Some((OldImage::Key, old)), new, .. } = decode(update).unwrap() else { panic!() };
        assert_eq!((old.len(), new.len()), (1, 1));
        let update_plain = Enc::default().u8(b'U').i32(7).u8(b'N').i16(0).bytes();
        assert!(matches!(decode(update_plain).unwrap(), Message::Update { old: None, .. }));
        let delete = Enc::default().u8(b'D').i32(7).u8(b'O').i16(1).text("9").bytes();
        assert!(matches!(decode(delete).unwrap(), Message::Delete { old: (OldImage::Full, _), .. }));
    }

    #[test]
    fn truncate_begin_commit_origin_type_message_decode() {
        let t = Enc::default().u8(b'T').i32(2).u8(3).i32(10).i32(11).bytes();
        assert_eq!(
            decode(t).unwrap(),
            Message::Truncate { relations: vec![10, 11], cascade: true, restart_identity: true }
        );
        let b = Enc::default().u8(b'B').i64(100).i64(5).i32(42).bytes();
        assert_eq!(decode(b).unwrap(), Message::Begin { final_lsn: 100, commit_time: 5, xid: 42 });
        let c = Enc::default().u8(b'C').u8(0).i64(100).i64(120).i64(5).bytes();
        assert_eq!(decode(c).unwrap(), Message::Commit { flags: 0, commit_lsn: 100, end_lsn: 120, commit_time: 5 });
        let o = Enc::default().u8(b'O').i64(9).s("node").bytes();
        assert_eq!(decode(o).unwrap(), Message::Origin { lsn: 9, name: "node".into() });
        let y = Enc::default().u8(b'Y').i32(99).s("public").s("mood").bytes();
        assert_eq!(decode(y).unwrap(), Message::Type { oid: 99, namespace: "public".into(), name: "mood".into() });
        let m = Enc::default().u8(b'M').u8(1).i64(77).s("sluice").i32(2).u8(b'h').u8(b'i').bytes();
        assert_eq!(
            decode(m).unwrap(),
            Message::Message {
                transactional: true,
                lsn: 77,
                prefix: "sluice".into(),
                content: Bytes::from_static(b"hi")
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(decode(Bytes::new()).is_err());
        assert!(decode(Bytes::from_static(b"Z")).is_err());
        let full = relation_bytes();
        for cut in 1..full.len() {
            assert!(decode(full.slice(..cut)).is_err(), "cut at {cut}");
        }
        let trailing = Enc::default().u8(b'B').i64(1).i64(2).i32(3).u8(0).bytes();
        assert!(decode(trailing).unwrap_err().reason.contains("trailing"));
        let bad_kind = Enc::default().u8(b'I').i32(7).u8(b'N').i16(1).u8(b'x').bytes();
        assert!(decode(bad_kind).unwrap_err().reason.contains("unknown tuple value kind"));
        let huge = Enc::default().u8(b'I').i32(7).u8(b'N').i16(i16::MAX).bytes();
        assert!(decode(huge).is_err());
        let negative_len = Enc::default().u8(b'I').i32(7).u8(b'N').i16(1).u8(b't').i32(-5).bytes();
        assert!(decode(negative_len).is_err());
    }

    #[test]
    fn tuples_decode_with_types() {
        let types = [("id".to_string(), PgType::Int4), ("name".to_string(), PgType::Text("text".into()))];
        let cols = || types.iter().map(|(n, t)| (n.as_str(), t));
        let row = decode_tuple(cols(), &[TupleValue::Text(Bytes::from_static(b"5")), TupleValue::Unchanged]).unwrap();
        assert_eq!(row, vec![Value::Int4(5), Value::Unchanged]);
        assert!(matches!(
            decode_tuple(cols(), &[TupleValue::Text(Bytes::from_static(b"x")), TupleValue::Null]),
            Err(TupleError::Value { .. })
        ));
        assert!(matches!(decode_tuple(cols(), &[TupleValue::Null]), Err(TupleError::Width { .. })));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(Bytes::from(bytes));
        }

        #[test]
        fn mutated_messages_never_panic(pos in 0usize..40, byte in any::<u8>(), cut in 0usize..40) {
            let mut v = relation_bytes().to_vec();
            let p = pos % v.len();
            v[p] = byte;
            v.truncate(v.len() - cut.min(v.len() - 1));
            let _ = decode(Bytes::from(v));
        }
    }
}
