//! Damage to a real log, checked block by block: writes go into a log (held there: the SAN is
//! down), the device "rots" at chosen bytes, the engine recovers it, and every block is read.
//! A block must read as its newest acknowledged data, or fail with Unrecovered Read Error when
//! that data was damaged — never older data, never garbage. Used by a test over many seeds and
//! by the fuzz target `log_damage`, which picks the bytes.
//!
//! What each corruption hits is worked out from the log itself: an entry's data (that entry is
//! lost), one half of a frame's header block (repaired from the other half), both halves (the
//! frame's entries are unknown: every block whose newest data is not after it may be lost).
//! The newest frame is never damaged: with nothing after it, damage there cannot be told from a
//! torn tail (docs/operations.md says so), which is the one case that stays undetectable.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::devices::SimDisk;
use super::model::{decode_block, encode_block};
use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64, LOG_BYTES_MIN, LOG_START};
use crate::destage::Destager;
use crate::engine::{Engine, EngineConfig, EngineState, HostDone, HostOp, Status};
use crate::io::{AlignedBuf, San};
use crate::log::FrameHeader;
use crate::node::Node;
use crate::policy::WritePolicy;
use crate::types::{Epoch, Lba, LogSeq, VolumeId};
use crate::VolumeSpec;

/// One rotten stretch: `len` bytes from `at` (a fraction of the damageable log, in 1/2^32)
/// XORed with `xor` (0 counts as 0x5A).
#[derive(Clone, Copy, Debug)]
pub struct Rot {
    pub at: u32,
    pub len: u16,
    pub xor: u8,
}

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct DamageStats {
    pub frames: usize,
    pub blocks_checked: u64,
    pub served: u64,
    pub refused: u64,
    pub entries_hit: usize,
    pub headers_repaired: usize,
    pub headers_unknown: usize,
}

const VOLUME: VolumeId = VolumeId(10);
const BLOCKS: u64 = 256;
const MS: u64 = 1_000_000;

struct Entry {
    seq: LogSeq,
    lba: u64,
    blocks: u64,
    /// Byte range of its data on the flash device.
    data: std::ops::Range<usize>,
    frame: usize,
}

fn spec() -> VolumeSpec {
    VolumeSpec {
        id: VOLUME,
        epoch: Epoch(1),
        blocks: BLOCKS,
        policy: WritePolicy::WriteBack,
        read_cache: false,
        unmap: false,
        replicas: Vec::new(),
        source: None,
    }
}

fn drive(node: &mut Node, now: &Rc<Cell<u64>>, until: impl Fn(&Node) -> bool) -> Result<(), String> {
    for _ in 0..2_000_000 {
        if until(node) {
            return Ok(());
        }
        now.set(now.get() + 20_000);
        node.poll(now.get());
    }
    Err("the engine did not get there".into())
}

/// Runs one case: `seed` picks the writes, `rots` the damage.
pub fn check(seed: u64, rots: &[Rot]) -> Result<DamageStats, String> {
    check_with(seed, rots, crate::engine::Bugs::default())
}

/// The same with deliberate bugs (mutation tests of the checks).
pub fn check_with(seed: u64, rots: &[Rot], bugs: crate::engine::Bugs) -> Result<DamageStats, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = Rc::new(Cell::new(1_000_000));
    let log_blocks = LOG_BYTES_MIN / BLOCK_SIZE_U64;
    let flash_bytes = LOG_START + ((log_blocks * 100).div_ceil(95) + 1) * BLOCK_SIZE_U64;
    let flash = SimDisk::create(flash_bytes, false, false, StdRng::seed_from_u64(rng.gen()), now.clone());
    let san = SimDisk::create(BLOCKS * BLOCK_SIZE_U64, false, true, StdRng::seed_from_u64(rng.gen()), now.clone());
    san.0.borrow_mut().down_until = u64::MAX;
    let cfg = EngineConfig { device_id: 3, cache_percent: 5, bugs, ..EngineConfig::default() };
    let engine = Engine::format(cfg.clone(), Box::new(flash.port(0)), vec![spec()]).map_err(|e| e.to_string())?;
    let destager =
        Destager::new(engine.layout(), Box::new(flash.port(1)), vec![(VOLUME, Box::new(san.clone()) as Box<dyn San>)]);
    let mut node = Node::new(engine, destager);
    drive(&mut node, &now, |n| *n.engine.state() == EngineState::Ready)?;
    let layout = node.engine.layout();

    // Writes, a few at a time (so frames hold several entries), then one last frame alone.
    let mut by_seq: BTreeMap<LogSeq, u64> = BTreeMap::new();
    let mut token = 0u64;
    let mut wid = 1u64;
    let rounds = rng.gen_range(5..40);
    for round in 0..=rounds {
        let n = if round == rounds { 1 } else { rng.gen_range(1..6) };
        let mut busy = vec![false; BLOCKS as usize];
        let mut ids = BTreeMap::new();
        for _ in 0..n {
            let blocks = if round == rounds { 1 } else { rng.gen_range(1..8u64) };
            let lba = if round == rounds { BLOCKS - 1 } else { rng.gen_range(0..BLOCKS - 1 - blocks) };
            if (lba..lba + blocks).any(|b| busy[b as usize]) {
                continue;
            }
            (lba..lba + blocks).for_each(|b| busy[b as usize] = true);
            let mut buf = AlignedBuf::new(blocks as usize * BLOCK_SIZE);
            for i in 0..blocks as usize {
                encode_block(&mut buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE], wid, 0, lba + i as u64);
            }
            token += 1;
            ids.insert(token, wid);
            node.engine.submit(VOLUME, token, HostOp::Write { lba: Lba(lba), buf, fua: false }, now.get());
            wid += 1;
        }
        let mut done: Vec<HostDone> = Vec::new();
        let want = ids.len();
        for _ in 0..200_000 {
            node.drain_completions(&mut done);
            if done.len() >= want {
                break;
            }
            now.set(now.get() + 20_000);
            node.poll(now.get());
        }
        if done.len() < want {
            return Err("writes did not complete".into());
        }
        for d in done {
            if d.status != Status::Ok {
                return Err(format!("a write ended {:?}", d.status));
            }
            let seq = d.seq.ok_or("a write-back write without a sequence number")?;
            by_seq.insert(seq, ids[&d.token]);
        }
    }
    drop(node);
    // The old node's operations still in the devices (the SAN was down) are gone with it.
    flash.0.borrow_mut().crash_in_flight();
    san.0.borrow_mut().crash_in_flight();

    // The log as written: frames and where each entry's data is.
    let (frames, entries) = {
        let f = flash.0.borrow();
        let mut frames = Vec::new();
        let mut entries = Vec::new();
        let mut pos = 0u64;
        while let Ok(h) =
            FrameHeader::decode(&f.image[layout.log_offset(crate::types::LogPos(pos)) as usize..][..BLOCK_SIZE])
        {
            if h.pos.0 != pos {
                break;
            }
            let at = layout.log_offset(h.pos) as usize;
            for (i, e) in h.entries.iter().enumerate() {
                let o = at + h.data_offset(i) as usize;
                entries.push(Entry {
                    seq: e.seq,
                    lba: e.lba.0,
                    blocks: e.blocks as u64,
                    data: o..o + e.data_bytes() as usize,
                    frame: frames.len(),
                });
            }
            let n = h.entries.len();
            pos += h.bytes();
            frames.push((at, n));
        }
        (frames, entries)
    };
    if frames.len() < 2 {
        return Err("too few frames".into());
    }
    // Rot, anywhere before the newest frame.
    let start = frames[0].0;
    let end = frames[frames.len() - 1].0;
    let mut stats = DamageStats { frames: frames.len(), ..DamageStats::default() };
    let mut entry_hit = vec![false; entries.len()];
    let mut half_hit = vec![[false; 2]; frames.len()];
    {
        let mut f = flash.0.borrow_mut();
        let before = f.image[start..end].to_vec();
        for r in rots {
            let at = start + ((r.at as u64 * (end - start) as u64) >> 32) as usize;
            let len = (r.len as usize).clamp(1, 70_000).min(end - at);
            let xor = if r.xor == 0 { 0x5A } else { r.xor };
            for b in &mut f.image[at..at + len] {
                *b ^= xor;
            }
        }
        // What is damaged is what differs in the end: two rots over the same bytes with the
        // same pattern cancel out.
        let changed = |range: std::ops::Range<usize>| {
            let (a, b) = (range.start.max(start), range.end.min(end));
            a < b && f.image[a..b] != before[a - start..b - start]
        };
        for (i, e) in entries.iter().enumerate() {
            entry_hit[i] = changed(e.data.clone());
        }
        for (k, &(fat, n)) in frames.iter().enumerate() {
            // The bytes each half's checks cover: frame header and the entry headers.
            let used = 64 + 64 * n;
            for (h, base) in [fat, fat + BLOCK_SIZE / 2].into_iter().enumerate() {
                half_hit[k][h] = changed(base..base + used);
            }
        }
    }
    let unknown: Vec<bool> = half_hit.iter().map(|h| h[0] && h[1]).collect();
    stats.entries_hit = entry_hit.iter().filter(|h| **h).count();
    stats.headers_repaired = half_hit.iter().filter(|h| h[0] != h[1]).count();
    stats.headers_unknown = unknown.iter().filter(|u| **u).count();

    // Recover, with the SAN back.
    san.0.borrow_mut().down_until = 0;
    let engine = Engine::open(cfg, Box::new(flash.port(0)), vec![spec()]).map_err(|e| e.to_string())?;
    let destager =
        Destager::new(engine.layout(), Box::new(flash.port(1)), vec![(VOLUME, Box::new(san.clone()) as Box<dyn San>)]);
    let mut node = Node::new(engine, destager);
    drive(&mut node, &now, |n| matches!(n.engine.state(), EngineState::Ready | EngineState::Failed(_)))?;
    if let EngineState::Failed(why) = node.engine.state() {
        return Err(format!("recovery failed: {why}"));
    }

    // What each block must read as: (newest write id, whether it may be refused, must be).
    let newest_entry = |b: u64| entries.iter().rposition(|e| (e.lba..e.lba + e.blocks).contains(&b));
    let check_all = |node: &mut Node, now: &Rc<Cell<u64>>, stats: &mut DamageStats, when: &str| -> Result<(), String> {
        for b in 0..BLOCKS {
            let (want, must_refuse, may_refuse) = match newest_entry(b) {
                Some(i) => {
                    let e = &entries[i];
                    let lost = entry_hit[i] || unknown[e.frame];
                    let later_unknown = unknown.iter().enumerate().any(|(k, u)| *u && k > e.frame);
                    (by_seq.get(&e.seq).copied().unwrap_or(u64::MAX), lost, lost || later_unknown)
                }
                None => (0, false, unknown.iter().any(|u| *u)),
            };
            node.engine.submit(
                VOLUME,
                1_000_000 + b,
                HostOp::Read { lba: Lba(b), blocks: 1, buf: AlignedBuf::new(BLOCK_SIZE) },
                now.get(),
            );
            let mut done = Vec::new();
            for _ in 0..200_000 {
                node.drain_completions(&mut done);
                if !done.is_empty() {
                    break;
                }
                now.set(now.get() + 20_000);
                node.poll(now.get());
            }
            let d = done.pop().ok_or_else(|| format!("{when}: read of block {b} never completed"))?;
            stats.blocks_checked += 1;
            match d.status {
                Status::MediumError if may_refuse => stats.refused += 1,
                Status::MediumError => {
                    return Err(format!("{when}: block {b} refused, but its newest data (write {want}) was intact"))
                }
                Status::Ok => {
                    let buf = d.buf.ok_or("a read without its buffer")?;
                    let found = decode_block(&buf, 0, b);
                    if must_refuse {
                        return Err(format!(
                            "{when}: block {b} read as write {found}, but its newest data (write {want}) was damaged"
                        ));
                    }
                    if found != want {
                        return Err(format!("{when}: block {b} read as write {found}, its newest is write {want}"));
                    }
                    stats.served += 1;
                }
                s => return Err(format!("{when}: read of block {b} ended {s:?}")),
            }
        }
        Ok(())
    };
    check_all(&mut node, &now, &mut stats, "after recovery")?;
    // Destage everything that survived; lost blocks must stay lost (the SAN has older data).
    drive(&mut node, &now, |n| n.engine.volume_metrics(VOLUME).is_some_and(|m| m.dirty_bytes == 0))?;
    now.set(now.get() + 10 * MS);
    let mut after = DamageStats::default();
    check_all(&mut node, &now, &mut after, "after destage")?;
    Ok(stats)
}
