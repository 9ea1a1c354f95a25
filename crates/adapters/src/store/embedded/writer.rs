//! The embedded store's writer: one thread takes every operation waiting, applies them in
//! order in one transaction, and syncs once if any of them must be durable (group commit).

use super::*;

pub(super) enum Op {
    Claim {
        key: String,
        owner: String,
        ttl: Duration,
        /// `hold`: take or renew the claim whatever result is stored.
        over_result: bool,
        reply: oneshot::Sender<Result<Claim, StoreError>>,
    },
    Complete {
        key: String,
        owner: String,
        result: String,
        retention: Duration,
        durable: bool,
        keep_claim: bool,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Release {
        key: String,
        owner: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Marks `key` as sent to the bridge until `until` (Unix ms), or drops the mark (`None`);
    /// answers whether a live mark was there (`crate::limits`). Batched with the rest, never
    /// synced on its own: it reaches the disk with the batch's durable results.
    Mark {
        key: String,
        until: Option<u64>,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

impl Op {
    fn durable(&self) -> bool {
        matches!(self, Op::Complete { durable: true, .. })
    }
}

pub(super) fn write_loop(db: &Database, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(Op::durable);
        let outcome = apply(db, &batch, durable);
        for (op, result) in batch.into_iter().zip(outcome) {
            match op {
                Op::Claim { reply, .. } => {
                    let _ = reply.send(result);
                }
                Op::Complete { reply, .. } | Op::Release { reply, .. } => {
                    let _ = reply.send(result.map(|_| ()));
                }
                Op::Mark { reply, .. } => {
                    // `apply_one` answers a mark with Busy when it was there already.
                    let _ = reply.send(result.map(|c| matches!(c, Claim::Busy(_))));
                }
            }
        }
    }
}

/// Applies a batch in one transaction; every operation gets its own answer if the commit
/// succeeds (a refused `complete` refuses only itself), or the commit's error.
fn apply(db: &Database, batch: &[Op], durable: bool) -> Vec<Result<Claim, StoreError>> {
    let run = || -> Result<Vec<Result<Claim, StoreError>>, StoreError> {
        let mut tx = db.begin_write().map_err(err)?;
        if !durable {
            tx.set_durability(Durability::None).map_err(err)?;
        }
        let claims = batch
            .iter()
            .map(|op| apply_one(&tx, op))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit().map_err(err)?;
        Ok(claims)
    };
    match run() {
        Ok(answers) => answers,
        Err(e) => batch
            .iter()
            .map(|_| Err(StoreError::Backend(e.to_string())))
            .collect(),
    }
}

/// One operation: `Err` for the store failing (the batch fails), `Ok(Err)` for a refusal.
fn apply_one(tx: &WriteTransaction, op: &Op) -> Result<Result<Claim, StoreError>, StoreError> {
    let mut results = tx.open_table(RESULTS).map_err(err)?;
    let mut claims = tx.open_table(CLAIMS).map_err(err)?;
    let holder = |claims: &redb::Table<&str, (u64, &str)>, key: &str| {
        claims.get(key).map_err(err).map(|v| {
            v.map(|v| (v.value().0, v.value().1.to_owned()))
                .filter(|(exp, _)| *exp > now_millis())
                .map(|(_, o)| o)
        })
    };
    match op {
        Op::Claim {
            key,
            owner,
            ttl,
            over_result,
            ..
        } => {
            if !over_result {
                let done = results.get(key.as_str()).map_err(err)?.and_then(|v| {
                    let (exp, r) = v.value();
                    (exp > now_secs()).then(|| r.to_owned())
                });
                if let Some(r) = done {
                    return Ok(Ok(Claim::Done(r)));
                }
            }
            if let Some(other) = holder(&claims, key)?.filter(|o| o != owner) {
                return Ok(Ok(Claim::Busy(other)));
            }
            claims
                .insert(
                    key.as_str(),
                    (now_millis() + ttl.as_millis() as u64, owner.as_str()),
                )
                .map_err(err)?;
            Ok(Ok(Claim::Mine))
        }
        Op::Complete {
            key,
            owner,
            result,
            retention,
            keep_claim,
            ..
        } => {
            if holder(&claims, key)?.as_deref() != Some(owner.as_str()) {
                return Ok(Err(StoreError::NotOwner));
            }
            results
                .insert(
                    key.as_str(),
                    (now_secs() + retention.as_secs(), result.as_str()),
                )
                .map_err(err)?;
            if !keep_claim {
                claims.remove(key.as_str()).map_err(err)?;
            }
            Ok(Ok(Claim::Mine))
        }
        Op::Mark { key, until, .. } => {
            let mut sent = tx.open_table(SENT).map_err(err)?;
            let now = now_millis();
            let before = match until {
                Some(until) => sent.insert(key.as_str(), *until).map_err(err)?,
                None => sent.remove(key.as_str()).map_err(err)?,
            };
            let earlier = before.is_some_and(|v| v.value() > now);
            Ok(Ok(if earlier {
                Claim::Busy(String::new())
            } else {
                Claim::Mine
            }))
        }
        Op::Release { key, owner, .. } => {
            let mine = claims
                .get(key.as_str())
                .map_err(err)?
                .is_some_and(|v| v.value().1 == owner.as_str());
            if mine {
                claims.remove(key.as_str()).map_err(err)?;
            }
            Ok(Ok(Claim::Mine))
        }
    }
}
