//! The model of what the host was promised: per block, every version written, in order, with
//! whether it was acknowledged, how (log sequence number or write-through), and whether a host
//! flush covered it. From that it answers "which values may a block hold now?".
//!
//! Rules (the host never has two overlapping commands in flight, like a careful initiator):
//! - allowed now = the newest acknowledged version, or any *uncertain* version after it (in
//!   flight, or interrupted by a crash, or ended `Busy`: it may or may not have landed);
//! - a read that observes an uncertain version promotes it to acknowledged (it must stick);
//! - a SAN power loss demotes acknowledged write-through versions no host flush covered to
//!   uncertain (the SAN may lose them; write-through promises only what the SAN promises).

use crate::constants::BLOCK_SIZE;

/// Value id of a block that does not decode (torn or foreign data).
pub const GARBAGE: u64 = u64::MAX;

/// Fills a block with a recognisable pattern for (write id, volume, lba).
pub fn encode_block(out: &mut [u8], id: u64, volume: u32, lba: u64) {
    assert_eq!(out.len(), BLOCK_SIZE);
    out[0..8].copy_from_slice(&id.to_le_bytes());
    out[8..12].copy_from_slice(&volume.to_le_bytes());
    out[12..20].copy_from_slice(&lba.to_le_bytes());
    let fill = (id as u8).wrapping_mul(31).wrapping_add(lba as u8) | 1;
    out[20..].fill(fill);
}

/// The write id a block holds: 0 for never written, `GARBAGE` if it does not decode.
pub fn decode_block(b: &[u8], volume: u32, lba: u64) -> u64 {
    let id = u64::from_le_bytes(b[0..8].try_into().unwrap());
    if id == 0 {
        // A slice comparison (memcmp), not an early-exit byte loop: zero blocks are common
        // (Write Zeroes, never-written blocks) and checked after every step.
        static ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
        return if b == &ZERO[..] { 0 } else { GARBAGE };
    }
    let fill = (id as u8).wrapping_mul(31).wrapping_add(lba as u8) | 1;
    let ok = u32::from_le_bytes(b[8..12].try_into().unwrap()) == volume
        && u64::from_le_bytes(b[12..20].try_into().unwrap()) == lba
        && b[20] == fill
        && b[BLOCK_SIZE / 2] == fill
        && b[BLOCK_SIZE - 1] == fill;
    if ok {
        id
    } else {
        GARBAGE
    }
}

#[derive(Clone, Debug)]
pub struct Version {
    pub id: u64,
    pub acked: bool,
    /// Log sequence number for writes acknowledged from the log.
    pub seq: Option<u64>,
    pub write_through: bool,
    pub ack_clock: u64,
    /// Covered by a completed host flush (or written with FUA).
    pub flushed: bool,
}

pub struct VolumeModel {
    pub blocks: Vec<Vec<Version>>,
    clock: u64,
    /// `clock` at the last SAN power loss: versions acknowledged before it may have been lost
    /// by the SAN unless flushed.
    power_loss_clock: u64,
}

pub struct Model {
    pub volumes: Vec<VolumeModel>,
}

/// What a check found wrong, classified by invariant.
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

impl Model {
    pub fn new(volumes: usize, blocks: u64) -> Model {
        let initial = Version { id: 0, acked: true, seq: Some(0), write_through: true, ack_clock: 0, flushed: true };
        Model {
            volumes: (0..volumes)
                .map(|_| VolumeModel {
                    blocks: (0..blocks).map(|_| vec![initial.clone()]).collect(),
                    clock: 0,
                    power_loss_clock: 0,
                })
                .collect(),
        }
    }

    pub fn write_submitted(&mut self, vol: usize, lba: u64, blocks: u32, id: u64) {
        for b in lba..lba + blocks as u64 {
            self.volumes[vol].blocks[b as usize].push(Version {
                id,
                acked: false,
                seq: None,
                write_through: false,
                ack_clock: 0,
                flushed: false,
            });
        }
    }

    pub fn write_acked(&mut self, vol: usize, lba: u64, blocks: u32, id: u64, seq: Option<u64>, fua: bool) {
        let v = &mut self.volumes[vol];
        v.clock += 1;
        for b in lba..lba + blocks as u64 {
            let ver = v.blocks[b as usize].iter_mut().rev().find(|x| x.id == id).expect("model: unknown version");
            ver.acked = true;
            ver.seq = seq;
            ver.write_through = seq.is_none();
            ver.ack_clock = v.clock;
            // Log-acknowledged data is durable in flash; FUA write-through is on stable SAN media.
            ver.flushed = seq.is_some() || fua;
        }
    }

    pub fn flush_submitted(&self, vol: usize) -> u64 {
        self.volumes[vol].clock
    }

    pub fn flush_done(&mut self, vol: usize, snapshot: u64) {
        for versions in &mut self.volumes[vol].blocks {
            for ver in versions.iter_mut() {
                if ver.acked && ver.ack_clock <= snapshot {
                    ver.flushed = true;
                }
            }
        }
    }

    /// The flash device was drained and reformatted: every acknowledged version is on the SAN,
    /// and sequence numbers start again from 1, so no version keeps its old one.
    pub fn reformatted(&mut self, vol: usize) {
        for versions in &mut self.volumes[vol].blocks {
            for ver in versions.iter_mut().filter(|v| v.acked) {
                ver.seq = None;
                ver.write_through = true;
            }
        }
    }

    /// The SAN lost its volatile cache.
    pub fn san_power_loss(&mut self, vol: usize) {
        self.volumes[vol].power_loss_clock = self.volumes[vol].clock;
        for versions in &mut self.volumes[vol].blocks {
            for ver in versions.iter_mut() {
                if ver.acked && ver.write_through && !ver.flushed {
                    ver.acked = false;
                }
            }
        }
    }

    fn newest_acked(versions: &[Version]) -> usize {
        versions.iter().rposition(|v| v.acked).expect("model: no acknowledged version")
    }

    /// Values a block may hold now.
    pub fn allowed(&self, vol: usize, lba: u64) -> Vec<u64> {
        let versions = &self.volumes[vol].blocks[lba as usize];
        let a = Model::newest_acked(versions);
        versions[a..].iter().enumerate().filter(|(i, v)| *i == 0 || !v.acked).map(|(_, v)| v.id).collect()
    }

    /// Checks a value seen by a host read or in the block's current location.
    pub fn check(
        &mut self,
        vol: usize,
        lba: u64,
        found: u64,
        promote: bool,
        invariant: &'static str,
    ) -> Result<(), Violation> {
        let allowed = self.allowed(vol, lba);
        if allowed.contains(&found) {
            if promote && allowed[0] != found {
                let versions = &mut self.volumes[vol].blocks[lba as usize];
                if let Some(v) = versions.iter_mut().rev().find(|v| v.id == found) {
                    v.acked = true;
                    v.write_through = true;
                    v.seq = None;
                }
            }
            return Ok(());
        }
        let power_loss_clock = self.volumes[vol].power_loss_clock;
        let versions = &self.volumes[vol].blocks[lba as usize];
        let a = Model::newest_acked(versions);
        let newest = &versions[a];
        let older = versions[..a].iter().any(|v| v.id == found);
        // Classify: an older value where the newest acknowledged write went straight to the SAN
        // is a stale overwrite (2), unless a SAN power loss took a flushed write (6).
        let invariant = if older && newest.write_through && newest.id != 0 {
            if newest.flushed && newest.ack_clock <= power_loss_clock {
                "invariant 6"
            } else {
                "invariant 2"
            }
        } else {
            invariant
        };
        Err(Violation {
            invariant,
            detail: format!(
                "volume #{vol} block {lba}: found write {} but allowed {:?} (history {:?})",
                fmt_id(found),
                allowed,
                history(versions)
            ),
        })
    }

    /// Invariant 4 (and 2): after a destage batch up to `watermark`, the SAN block must hold the
    /// volume as of that watermark: the newest version that is write-through or logged at or
    /// below the watermark, or an uncertain one after it.
    pub fn check_san_at(&self, vol: usize, lba: u64, found: u64, watermark: u64) -> Result<(), Violation> {
        let versions = &self.volumes[vol].blocks[lba as usize];
        let base = versions
            .iter()
            .rposition(|v| v.acked && (v.write_through || v.seq.is_none_or(|s| s <= watermark)))
            .expect("model: no base version");
        let ok = versions[base].id == found || versions[base + 1..].iter().any(|v| !v.acked && v.id == found);
        if ok {
            return Ok(());
        }
        let invariant = if versions[..base].iter().any(|v| v.id == found) { "invariant 2" } else { "invariant 4" };
        Err(Violation {
            invariant,
            detail: format!(
                "volume #{vol} block {lba} on the SAN after batch to seq {watermark}: found write {} but expected {} (history {:?})",
                fmt_id(found),
                versions[base].id,
                history(versions)
            ),
        })
    }
}

fn fmt_id(id: u64) -> String {
    if id == GARBAGE {
        "<garbage>".into()
    } else {
        id.to_string()
    }
}

fn history(versions: &[Version]) -> Vec<String> {
    versions
        .iter()
        .map(|v| {
            format!(
                "{}{}{}{}",
                v.id,
                if v.acked { "" } else { "?" },
                match (v.write_through, v.seq) {
                    (true, _) => "wt".to_string(),
                    (false, Some(s)) => format!("@{s}"),
                    (false, None) => String::new(),
                },
                if v.flushed { "f" } else { "" }
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_pattern_round_trips_and_detects_tearing() {
        let mut b = vec![0u8; BLOCK_SIZE];
        encode_block(&mut b, 77, 2, 9);
        assert_eq!(decode_block(&b, 2, 9), 77);
        assert_eq!(decode_block(&b, 2, 10), GARBAGE);
        b[BLOCK_SIZE - 1] ^= 0xff;
        assert_eq!(decode_block(&b, 2, 9), GARBAGE);
        assert_eq!(decode_block(&[0u8; BLOCK_SIZE], 2, 9), 0);
    }

    #[test]
    fn allowed_values_follow_acks_and_power_loss() {
        let mut m = Model::new(1, 4);
        m.write_submitted(0, 1, 1, 5);
        assert_eq!(m.allowed(0, 1), vec![0, 5]);
        m.write_acked(0, 1, 1, 5, None, false);
        assert_eq!(m.allowed(0, 1), vec![5]);
        m.san_power_loss(0);
        assert_eq!(m.allowed(0, 1), vec![0, 5]);
        m.write_submitted(0, 2, 1, 6);
        m.write_acked(0, 2, 1, 6, None, false);
        let snap = m.flush_submitted(0);
        m.flush_done(0, snap);
        m.san_power_loss(0);
        assert_eq!(m.allowed(0, 2), vec![6]);
    }
}
