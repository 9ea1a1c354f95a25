//! Reading the stored state back: the records a read brought, where a fold may start (an
//! operator's *anchored* entry, whose writer had read everything before it), the fold from
//! there, where to read next when no anchor is in sight, and the best guess when none is left.
//!
//! In: the records in stream order. Out: the [`Folded`] state. Pure, like [`super::fold`].

use super::fold::{distrust, parse, restrictiveness, step_by, Folded, Who, Writer, LONE_LOOSENING};
use super::loosening::{self, Rules};
use super::ControlState;

/// One message read from the stream: its offset, its writer, its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub writer: Writer,
    pub body: Vec<u8>,
    /// The broker-checked user who wrote it.
    pub user: Option<String>,
}

/// Where a pass starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// The stream's last chunk.
    Last,
    /// The stream's first entry still kept.
    First,
    Offset(u64),
}

/// The index in `records` (read in stream order, starting at `from`) where a fold may start:
/// the latest entry written by an operator whose `after` names the record just before it, or
/// the stream's first entry written with `after: None`.
pub fn anchor(records: &[Record], from: ReadFrom) -> Option<usize> {
    (0..records.len())
        .rev()
        .find(|&i| is_anchor(records, i, from))
}

/// The state folded from the anchor in `records` over everything after it, or `None` when
/// they hold no anchor.
pub fn fold_records(records: &[Record], from: ReadFrom) -> Option<Folded> {
    fold_records_by(records, from, Rules::default())
}

/// As [`fold_records`], under `rules`. With two people to loosen, every anchor after the first
/// one read is checked against the state folded up to it: one whose snapshot loosens that state
/// (a halt lifted, an agent released, a cut lifted), other than by the second that completes a
/// proposal, is a lone operator's loosening, and the state stays what it was, untrusted (held at
/// least paused, alerted) instead. (The first anchor read is where the read starts, as with one
/// person's rules.)
pub fn fold_records_by(records: &[Record], from: ReadFrom, rules: Rules) -> Option<Folded> {
    if !rules.two_people() {
        let i = anchor(records, from)?;
        let start = parse(&records[i].body).ok()?.state;
        let step = |f: Folded, r: &Record| step_by(f, &r.body, r.writer, Who::anyone());
        return Some(records[i + 1..].iter().fold(Folded::State(start), step));
    }
    let first = (0..records.len()).find(|&i| is_anchor(records, i, from))?;
    let mut folded = Folded::State(parse(&records[first].body).ok()?.state);
    for (i, r) in records.iter().enumerate().skip(first + 1) {
        let who = Who {
            user: r.user.as_deref(),
            rules,
        };
        let snapshot = is_anchor(records, i, from)
            .then(|| parse(&r.body).ok())
            .flatten()
            .map(|e| e.state);
        folded = match (snapshot, folded.effective()) {
            (Some(snap), Some(now)) if loosening::loosens(&now, &snap) => {
                match step_by(folded.clone(), &r.body, r.writer, who).effective() {
                    // Its own change loosens too: the second that completes a proposal.
                    Some(s) if loosening::loosens(&now, &s) => Folded::State(snap),
                    _ => distrust(folded, LONE_LOOSENING.into()),
                }
            }
            (Some(snap), _) => Folded::State(snap),
            (None, _) => step_by(folded, &r.body, r.writer, who),
        };
    }
    Some(folded)
}

/// Whether record `i` is an anchor: written by an operator, naming the record just before it
/// (or the stream's first entry written with `after: None`).
fn is_anchor(records: &[Record], i: usize, from: ReadFrom) -> bool {
    let r = &records[i];
    if r.writer != Writer::Operator {
        return false;
    }
    match parse(&r.body).map(|e| e.after) {
        Err(_) => false,
        Ok(None) => i == 0 && from == ReadFrom::First,
        Ok(Some(a)) => i > 0 && records[i - 1].offset == a,
    }
}

/// Where to read next when `records` (read from `from`) hold no anchor: the earliest entry any
/// of them names, else the stream's first entry; `None` when nothing earlier can be read.
pub fn walk_back(records: &[Record], from: ReadFrom) -> Option<ReadFrom> {
    let first = records.first()?.offset;
    let earliest = records
        .iter()
        .filter(|r| r.writer != Writer::Untrusted)
        .filter_map(|r| parse(&r.body).ok()?.after)
        .min();
    match (from, earliest) {
        // Read from the first entry kept: nothing earlier is left.
        (ReadFrom::First, _) => None,
        (_, Some(a)) if a < first => Some(ReadFrom::Offset(a)),
        _ => Some(ReadFrom::First),
    }
}

/// The best a reader can say when no anchor is left: the latest trusted writer's state, with
/// the strictest mode and every quarantine and cut service any trusted entry it read holds.
pub fn best_guess(records: &[Record]) -> Option<ControlState> {
    let trusted: Vec<ControlState> = records
        .iter()
        .filter(|r| r.writer != Writer::Untrusted)
        .filter_map(|r| parse(&r.body).ok().map(|e| e.state))
        .collect();
    let mut guess = trusted.last()?.clone();
    for s in &trusted {
        if restrictiveness(s.mode) > restrictiveness(guess.mode) {
            guess.mode = s.mode;
        }
        for (agent, q) in &s.quarantined {
            guess
                .quarantined
                .entry(agent.clone())
                .or_insert_with(|| q.clone());
        }
        for (service, r) in &s.revoked {
            guess
                .revoked
                .entry(service.clone())
                .or_insert_with(|| r.clone());
        }
    }
    Some(guess)
}
