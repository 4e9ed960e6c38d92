//! The two `pgoutput` messages the WAL source decodes itself: `Relation`
//! (which columns a table has) and `Insert` (a new row, its values as
//! text). Begin, Commit and logical decoding messages come decoded from the
//! replication client; everything else (updates, deletes, truncates, types)
//! is skipped, since the publication carries inserts only.
//!
//! The layout is PostgreSQL's "Logical Replication Message Formats",
//! protocol version 1 (no streamed transactions).

use std::collections::HashMap;

/// A table as a `Relation` message describes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Relation {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) columns: Vec<String>,
}

/// One column's value in an `Insert`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    /// An unchanged TOASTed value (never in an insert; kept for the format).
    Unchanged,
    Text(String),
}

/// A decoded message.
#[derive(Debug, PartialEq)]
pub(crate) enum Change {
    Relation(u32, Relation),
    Insert {
        relation: u32,
        values: Vec<Value>,
    },
    /// Any other message type (its tag), ignored.
    Other(u8),
}

/// Decodes one `XLogData` payload.
pub(crate) fn decode(data: &[u8]) -> Result<Change, String> {
    let mut r = Reader { data, at: 0 };
    match r.u8()? {
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let _replica_identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let _flags = r.u8()?;
                columns.push(r.cstr()?);
                let _type_oid = r.u32()?;
                let _type_modifier = r.u32()?;
            }
            Ok(Change::Relation(
                id,
                Relation {
                    namespace,
                    name,
                    columns,
                },
            ))
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => {}
                t => return Err(format!("insert: expected tuple tag N, got {:?}", t as char)),
            }
            let n = r.u16()?;
            let mut values = Vec::with_capacity(n as usize);
            for _ in 0..n {
                values.push(match r.u8()? {
                    b'n' => Value::Null,
                    b'u' => Value::Unchanged,
                    b't' => {
                        let len = r.u32()? as usize;
                        let bytes = r.take(len)?;
                        Value::Text(
                            String::from_utf8(bytes.to_vec())
                                .map_err(|_| "insert: a text value is not UTF-8".to_string())?,
                        )
                    }
                    b'b' => return Err("insert: binary tuple values are not requested".into()),
                    t => return Err(format!("insert: unknown column kind {:?}", t as char)),
                });
            }
            Ok(Change::Insert { relation, values })
        }
        tag => Ok(Change::Other(tag)),
    }
}

/// The relations seen on a stream, by id (a `Relation` precedes the first
/// change of a table on every connection, and again after its schema
/// changed).
#[derive(Debug, Default)]
pub(crate) struct Relations(HashMap<u32, Relation>);

impl Relations {
    pub(crate) fn learn(&mut self, id: u32, rel: Relation) {
        self.0.insert(id, rel);
    }

    pub(crate) fn get(&self, id: u32) -> Option<&Relation> {
        self.0.get(&id)
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.data.len());
        let end = end.ok_or_else(|| format!("message cut short at byte {}", self.at))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self) -> Result<String, String> {
        let rest = &self.data[self.at..];
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| "unterminated string".to_string())?;
        let s = String::from_utf8(rest[..nul].to_vec()).map_err(|_| "a name is not UTF-8")?;
        self.at += nul + 1;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16_384u32.to_be_bytes());
        m.extend(b"public\0outbox\0");
        m.push(b'd');
        m.extend(2u16.to_be_bytes());
        for name in ["id", "payload"] {
            m.push(0);
            m.extend(name.as_bytes());
            m.push(0);
            m.extend(20u32.to_be_bytes());
            m.extend(u32::MAX.to_be_bytes());
        }
        m
    }

    #[test]
    fn relation_and_insert_decode() {
        let Change::Relation(id, rel) = decode(&relation()).unwrap() else {
            panic!()
        };
        assert_eq!(id, 16_384);
        assert_eq!(
            (rel.namespace.as_str(), rel.name.as_str()),
            ("public", "outbox")
        );
        assert_eq!(rel.columns, ["id", "payload"]);

        let mut m = vec![b'I'];
        m.extend(16_384u32.to_be_bytes());
        m.push(b'N');
        m.extend(3u16.to_be_bytes());
        m.push(b't');
        m.extend(2u32.to_be_bytes());
        m.extend(b"42");
        m.push(b'n');
        m.push(b'u');
        assert_eq!(
            decode(&m).unwrap(),
            Change::Insert {
                relation: 16_384,
                values: vec![Value::Text("42".into()), Value::Null, Value::Unchanged]
            }
        );
    }

    #[test]
    fn cut_or_odd_messages_are_errors_not_panics() {
        let whole = relation();
        for cut in 1..whole.len() {
            assert!(decode(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut m = vec![b'I'];
        m.extend(1u32.to_be_bytes());
        m.push(b'N');
        m.extend(1u16.to_be_bytes());
        m.push(b't');
        m.extend(u32::MAX.to_be_bytes());
        assert!(decode(&m).is_err(), "a length past the end");
        assert_eq!(decode(b"Dxyz").unwrap(), Change::Other(b'D'));
        assert!(decode(b"").is_err());
    }
}
