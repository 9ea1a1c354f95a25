//! The hash-chained audit file.
//!
//! Each line is `{"seq":N,"prev":"<hash of line N-1>","hash":"<hash>","record":{...}}`, where
//! hash = SHA-256 of `seq + "\n" + prev + "\n" + <the record's exact JSON text>`. Changing,
//! removing or reordering a line breaks the chain from there. The head (last seq and hash) is
//! also written to `<file>.head` after every append, so a file cut short is detectable too. One
//! writer holds an exclusive lock on the file, so the chain can't fork.
//!
//! Keyed: with a chain key (`audit.chain_key_env`), each hash is an HMAC-SHA256 with that key
//! instead, and the line says `"keyed":true`, so rewriting the file and recomputing every link
//! needs the key too; verifying a keyed chain needs it, and with a key every line must be keyed.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::bridge::signing::Secret;

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("audit file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit file {0} is locked by another writer")]
    Locked(String),
    #[error("audit file {path}: line {line} is not a chain record: {why}")]
    Corrupt {
        path: String,
        line: usize,
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
    /// Where the last record was read in the audit stream (for the sink to resume after it).
    /// Not part of the chain's integrity: a record is proven by its hash link, not by this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    prev: &'a str,
    hash: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    keyed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    record: &'a RawValue,
}

#[derive(Deserialize)]
struct LineIn<'a> {
    seq: u64,
    prev: String,
    hash: String,
    #[serde(default)]
    keyed: bool,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow)]
    record: &'a RawValue,
}

/// The link of a keyed chain: HMAC-SHA256 with the chain key over the same text.
pub fn keyed_link_hash(key: &Secret, seq: u64, prev: &str, record_json: &str) -> String {
    crate::bridge::signing::mac(key, format!("{seq}\n{prev}\n{record_json}").as_bytes())
}

fn link(key: Option<&Secret>, seq: u64, prev: &str, record_json: &str) -> String {
    match key {
        Some(k) => keyed_link_hash(k, seq, prev, record_json),
        None => link_hash(seq, prev, record_json),
    }
}

pub fn link_hash(seq: u64, prev: &str, record_json: &str) -> String {
    let mut h = Sha256::new();
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(record_json.as_bytes());
    hex::encode(h.finalize())
}

/// One chain line read back, its record's JSON text as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLine {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    pub keyed: bool,
    pub record: String,
}

impl ReadLine {
    pub fn parse(line: &str) -> Result<Self, String> {
        let l: LineIn = serde_json::from_str(line).map_err(|e| e.to_string())?;
        Ok(Self {
            seq: l.seq,
            prev: l.prev,
            hash: l.hash,
            keyed: l.keyed,
            record: l.record.get().to_owned(),
        })
    }

    /// Whether its hash is the link of its seq, prev and record (keyed with `key`).
    pub fn holds(&self, key: Option<&Secret>) -> bool {
        self.keyed == key.is_some() && link(key, self.seq, &self.prev, &self.record) == self.hash
    }
}

/// Every line of the chain at `path`, as written, in order.
pub fn lines(path: &Path) -> Result<Vec<String>, ChainError> {
    let f = File::open(path).map_err(io(path))?;
    BufReader::new(f)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(io(path))
}

pub fn head_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".head");
    PathBuf::from(p)
}

/// The single writer of an audit file.
pub struct ChainWriter {
    path: PathBuf,
    file: File,
    head: Head,
    key: Option<Secret>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ChainError + '_ {
    move |source| ChainError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl ChainWriter {
    /// Opens (or creates) `path`, takes the writer lock, and checks the existing chain so a
    /// damaged file is never extended.
    pub fn open(path: &Path) -> Result<Self, ChainError> {
        Self::open_keyed(path, None)
    }

    /// Opens (verified with `key`) a chain whose new links are keyed with `key`.
    pub fn open_keyed(path: &Path, key: Option<Secret>) -> Result<Self, ChainError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(io(path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ChainError::Locked(path.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(path)(e)),
        }
        let report = verify_with(path, key.as_ref())?;
        if let Some(bad) = report.first_bad {
            return Err(ChainError::Corrupt {
                path: path.display().to_string(),
                line: bad.line,
                why: bad.why,
            });
        }
        let head = report.last.unwrap_or(Head {
            seq: 0,
            hash: GENESIS.into(),
            offset: None,
        });
        Ok(Self {
            path: path.to_owned(),
            file,
            head,
            key,
        })
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Appends one record and makes it durable (file, then head) before returning.
    pub fn append(&mut self, record_json: &str) -> Result<Head, ChainError> {
        self.append_at(record_json, None)
    }

    /// Appends one record read at `offset` of the audit stream (kept with it, so the sink
    /// resumes after the last record it holds).
    pub fn append_at(
        &mut self,
        record_json: &str,
        offset: Option<u64>,
    ) -> Result<Head, ChainError> {
        let raw: &RawValue =
            serde_json::from_str(record_json).map_err(|e| ChainError::Corrupt {
                path: self.path.display().to_string(),
                line: self.head.seq as usize + 1,
                why: format!("record is not JSON: {e}"),
            })?;
        let seq = self.head.seq + 1;
        let hash = link(self.key.as_ref(), seq, &self.head.hash, raw.get());
        let line = serde_json::to_string(&LineOut {
            seq,
            prev: &self.head.hash,
            hash: &hash,
            keyed: self.key.is_some(),
            offset,
            record: raw,
        })
        .expect("serializes");
        let p = self.path.clone();
        self.file.write_all(line.as_bytes()).map_err(io(&p))?;
        self.file.write_all(b"\n").map_err(io(&p))?;
        self.file.sync_data().map_err(io(&p))?;
        let head = Head { seq, hash, offset };
        let hp = head_path(&self.path);
        let tmp = hp.with_extension("head.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&head).expect("serializes")).map_err(io(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &hp).map_err(io(&hp))?;
        self.head = head.clone();
        Ok(head)
    }
}

/// Where a chain first goes wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadRecord {
    /// 1-based line number.
    pub line: usize,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub last: Option<Head>,
    pub first_bad: Option<BadRecord>,
    /// The head file's view, when present.
    pub head_file: Option<Head>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Checks every link, then the file's end against the head file (an unkeyed chain).
pub fn verify(path: &Path) -> Result<VerifyReport, ChainError> {
    verify_with(path, None)
}

/// Checks every link with the chain key (every line must then be keyed), or without one (a
/// keyed line is then reported as needing the key), then the file's end against the head file.
pub fn verify_with(path: &Path, key: Option<&Secret>) -> Result<VerifyReport, ChainError> {
    let f = File::open(path).map_err(io(path))?;
    let mut prev = GENESIS.to_owned();
    let mut records = 0u64;
    let mut last = None;
    let mut first_bad = None;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(io(path))?;
        let bad = |why: String| Some(BadRecord { line: n, why });
        let parsed: LineIn = match serde_json::from_str(&line) {
            Ok(l) => l,
            Err(e) => {
                first_bad = bad(format!("not a chain record ({e})"));
                break;
            }
        };
        if parsed.seq != records + 1 {
            first_bad = bad(format!(
                "seq {} where {} was expected (a record removed or reordered)",
                parsed.seq,
                records + 1
            ));
            break;
        }
        if parsed.prev != prev {
            first_bad = bad("prev does not match the previous record's hash".into());
            break;
        }
        match (key.is_some(), parsed.keyed) {
            (true, false) => {
                first_bad =
                    bad("an unkeyed record in a keyed chain (rewritten without the key?)".into());
                break;
            }
            (false, true) => {
                first_bad = bad(
                    "a keyed record: verifying it needs the chain key (audit.chain_key_env)".into(),
                );
                break;
            }
            _ => {}
        }
        let h = link(key, parsed.seq, &parsed.prev, parsed.record.get());
        if h != parsed.hash {
            first_bad = bad("hash does not match the record (the record was altered)".into());
            break;
        }
        records += 1;
        prev = parsed.hash.clone();
        last = Some(Head {
            seq: parsed.seq,
            hash: parsed.hash,
            offset: parsed.offset,
        });
    }
    let head_file = std::fs::read(head_path(path))
        .ok()
        .and_then(|b| serde_json::from_slice::<Head>(&b).ok());
    if first_bad.is_none() {
        if let Some(h) = &head_file {
            let have = last.as_ref().map(|l| l.seq).unwrap_or(0);
            if h.seq > have {
                first_bad = Some(BadRecord {
                    line: have as usize + 1,
                    why: format!(
                        "the file ends at record {have} but its head says {}: the tail was cut off",
                        h.seq
                    ),
                });
            } else if last
                .as_ref()
                .is_some_and(|l| l.seq == h.seq && l.hash != h.hash)
            {
                first_bad = Some(BadRecord {
                    line: h.seq as usize,
                    why: "the last record's hash differs from the head file".into(),
                });
            }
        }
    }
    Ok(VerifyReport {
        records,
        last,
        first_bad,
        head_file,
    })
}

/// Records matching a filter, for `audit show`.
pub fn select(
    path: &Path,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Result<Vec<serde_json::Value>, ChainError> {
    let f = File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io(path))?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| ChainError::Corrupt {
                path: path.display().to_string(),
                line: i + 1,
                why: e.to_string(),
            })?;
        if keep(&v["record"]) {
            out.push(v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        std::env::temp_dir().join(format!("audit-{}.jsonl", uuid::Uuid::new_v4().simple()))
    }

    fn cleanup(p: &Path) {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(head_path(p));
    }

    #[test]
    fn a_chain_verifies_and_reopens_where_it_ended() {
        let p = tmp();
        {
            let mut w = ChainWriter::open(&p).unwrap();
            for i in 0..5 {
                w.append(&format!(
                    r#"{{"kind":"command","action_id":"a{i}","n":{i}}}"#
                ))
                .unwrap();
            }
            assert!(
                matches!(ChainWriter::open(&p), Err(ChainError::Locked(_))),
                "one writer"
            );
        }
        let r = verify(&p).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.records, 5);
        let mut w = ChainWriter::open(&p).unwrap();
        assert_eq!(w.head().seq, 5);
        w.append(r#"{"kind":"control"}"#).unwrap();
        drop(w);
        assert_eq!(verify(&p).unwrap().records, 6);
        cleanup(&p);
    }

    #[test]
    fn a_keyed_chain_needs_the_key_to_verify_and_to_forge() {
        let p = tmp();
        let key = Secret::new("chain-key");
        let mut w = ChainWriter::open_keyed(&p, Some(key.clone())).unwrap();
        w.append(r#"{"n":1}"#).unwrap();
        w.append(r#"{"n":2}"#).unwrap();
        drop(w);
        assert!(verify_with(&p, Some(&key)).unwrap().ok());
        let without = verify(&p).unwrap();
        assert!(without
            .first_bad
            .unwrap()
            .why
            .contains("needs the chain key"));
        assert!(!verify_with(&p, Some(&Secret::new("other"))).unwrap().ok());
        // A forger without the key rewrites a record and recomputes every link with SHA-256.
        let text = std::fs::read_to_string(&p).unwrap();
        let mut prev = GENESIS.to_owned();
        let mut forged = String::new();
        for (i, line) in text.lines().enumerate() {
            let record = if i == 0 { r#"{"n":100}"# } else { r#"{"n":2}"# };
            let seq = i as u64 + 1;
            let hash = link_hash(seq, &prev, record);
            forged.push_str(&format!(
                "{{\"seq\":{seq},\"prev\":\"{prev}\",\"hash\":\"{hash}\",\"keyed\":true,\"record\":{record}}}\n"
            ));
            let _ = line;
            prev = hash;
        }
        std::fs::write(&p, forged).unwrap();
        let _ = std::fs::remove_file(head_path(&p));
        let r = verify_with(&p, Some(&key)).unwrap();
        assert_eq!(
            r.first_bad.unwrap().line,
            1,
            "the forgery is found at its first line"
        );
        cleanup(&p);
    }

    #[test]
    fn tampering_and_a_cut_tail_are_found() {
        let p = tmp();
        {
            let mut w = ChainWriter::open(&p).unwrap();
            for i in 0..4 {
                w.append(&format!(r#"{{"action_id":"a{i}","status":"BLOCKED"}}"#))
                    .unwrap();
            }
        }
        let original = std::fs::read_to_string(&p).unwrap();
        // Alter record 3.
        std::fs::write(
            &p,
            original.replacen(
                r#""action_id":"a2","status":"BLOCKED""#,
                r#""action_id":"a2","status":"SUCCESS""#,
                1,
            ),
        )
        .unwrap();
        let r = verify(&p).unwrap();
        assert_eq!(r.first_bad.as_ref().unwrap().line, 3, "{r:?}");
        assert!(r.first_bad.unwrap().why.contains("altered"));
        // Remove record 2.
        let lines: Vec<&str> = original.lines().collect();
        std::fs::write(&p, format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3])).unwrap();
        assert_eq!(verify(&p).unwrap().first_bad.unwrap().line, 2);
        // Cut the tail: links are fine, the head file says more.
        std::fs::write(&p, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
        let r = verify(&p).unwrap();
        let bad = r.first_bad.unwrap();
        assert_eq!(bad.line, 3);
        assert!(bad.why.contains("cut off"), "{}", bad.why);
        // A damaged file is never extended.
        assert!(matches!(
            ChainWriter::open(&p),
            Err(ChainError::Corrupt { .. })
        ));
        cleanup(&p);
    }
}
