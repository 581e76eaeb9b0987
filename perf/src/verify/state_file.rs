//! The verify state file (`--verify-state FILE`): what a run knows about every block it (or an
//! earlier run) wrote, so a later run or `stager-perf verify` can check it — typically after
//! the target was killed and restarted.
//!
//! Binary, little-endian, compact (20 bytes a block), checksummed, written atomically
//! (temporary file + fsync + rename, so a harness killed while saving leaves the old file):
//!
//! ```text
//! offset   size     field
//!      0      8     magic "STGVSTAT"
//!      8      4     format version (1)
//!     12      4     block_bytes: logical block size the LBAs count in
//!     16      4     nsid
//!     20      2     seed_count S (<= 65535)
//!     22      2     subnqn_bytes N (<= 223)
//!     24      8     entry_count E (<= VERIFY_BLOCKS_MAX)
//!     32      N     subnqn, UTF-8
//!   32+N     8*S    seeds: run seed ids (u64)
//!    ...    20*E    entries, ascending by LBA:
//!                     lba u64, acked_generation u32, pending_generation u32,
//!                     acked_seed u16, pending_seed u16   (seed = index into seeds;
//!                     generation 0 = none; a pending generation is a write that was in
//!                     flight when the run ended: it may or may not have landed)
//!    end      4     CRC32C of every byte before it
//! ```
//!
//! Decoding checks every length against the file size before reading, every index against its
//! table, and the checksum, so a truncated or damaged file is an error naming the problem.

use std::io::Write;
use std::path::Path;

use super::{BlockState, VerifyState};
use crate::constants::{VERIFY_BLOCKS_MAX, VERIFY_SEEDS_MAX, VERIFY_STATE_BYTES_MAX};
use crate::PerfError;

pub const MAGIC: [u8; 8] = *b"STGVSTAT";
pub const VERSION: u32 = 1;
const HEADER_BYTES: usize = 32;
const ENTRY_BYTES: usize = 20;
const CRC_BYTES: usize = 4;

pub fn encode(st: &VerifyState) -> Vec<u8> {
    let nqn = st.subnqn.as_bytes();
    let nqn = &nqn[..nqn.len().min(stager_nvme::fabrics::NQN_MAX_BYTES)];
    let mut b = Vec::with_capacity(HEADER_BYTES + nqn.len() + st.seeds.len() * 8 + st.entries.len() * ENTRY_BYTES + 4);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&st.block_bytes.to_le_bytes());
    b.extend_from_slice(&st.nsid.to_le_bytes());
    b.extend_from_slice(&(st.seeds.len() as u16).to_le_bytes());
    b.extend_from_slice(&(nqn.len() as u16).to_le_bytes());
    b.extend_from_slice(&(st.entries.len() as u64).to_le_bytes());
    b.extend_from_slice(nqn);
    for s in &st.seeds {
        b.extend_from_slice(&s.to_le_bytes());
    }
    for (lba, e) in &st.entries {
        b.extend_from_slice(&lba.to_le_bytes());
        b.extend_from_slice(&e.acked_generation.to_le_bytes());
        b.extend_from_slice(&e.pending_generation.to_le_bytes());
        b.extend_from_slice(&e.acked_seed.to_le_bytes());
        b.extend_from_slice(&e.pending_seed.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("file is truncated")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        let mut x = [0u8; 8];
        x.copy_from_slice(s);
        Ok(u64::from_le_bytes(x))
    }
}

pub fn decode(b: &[u8]) -> Result<VerifyState, String> {
    if b.len() < HEADER_BYTES + CRC_BYTES {
        return Err(format!("{} bytes is too short for a verify state file", b.len()));
    }
    if b[..8] != MAGIC {
        return Err("not a stager-perf verify state file (bad magic)".into());
    }
    let (body, crc) = b.split_at(b.len() - CRC_BYTES);
    let mut r = Reader { b: body, at: 8 };
    let version = r.u32()?;
    if version != VERSION {
        return Err(format!("format version {version}, this stager-perf reads {VERSION}"));
    }
    let stored_crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != stored_crc {
        return Err("checksum mismatch: the file is damaged or truncated".into());
    }
    let block_bytes = r.u32()?;
    if !(512..=65536).contains(&block_bytes) || !block_bytes.is_power_of_two() {
        return Err(format!("block size {block_bytes} is not a power of two from 512 to 65536"));
    }
    let nsid = r.u32()?;
    let seed_count = r.u16()? as usize;
    let nqn_len = r.u16()? as usize;
    let entry_count = r.u64()?;
    if nqn_len > stager_nvme::fabrics::NQN_MAX_BYTES {
        return Err(format!("subsystem NQN of {nqn_len} bytes is too long"));
    }
    if seed_count > VERIFY_SEEDS_MAX {
        return Err(format!("{seed_count} seeds, more than {VERIFY_SEEDS_MAX}"));
    }
    if entry_count > VERIFY_BLOCKS_MAX {
        return Err(format!("{entry_count} blocks, more than the {VERIFY_BLOCKS_MAX} a state may hold"));
    }
    let want = HEADER_BYTES + nqn_len + seed_count * 8 + entry_count as usize * ENTRY_BYTES;
    if body.len() != want {
        return Err(format!("file holds {} bytes, its header says {}", b.len(), want + CRC_BYTES));
    }
    let subnqn =
        std::str::from_utf8(r.take(nqn_len)?).map_err(|_| "subsystem NQN is not UTF-8".to_string())?.to_string();
    let seeds = (0..seed_count).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
    let mut entries = Vec::with_capacity(entry_count as usize);
    let mut last: Option<u64> = None;
    for _ in 0..entry_count {
        let lba = r.u64()?;
        let st = BlockState {
            acked_generation: r.u32()?,
            pending_generation: r.u32()?,
            acked_seed: r.u16()?,
            pending_seed: r.u16()?,
        };
        if last.is_some_and(|l| lba <= l) {
            return Err(format!("entries are not in ascending LBA order at LBA {lba}"));
        }
        last = Some(lba);
        if st.is_empty() {
            return Err(format!("entry for LBA {lba} records no write"));
        }
        for (g, s) in [(st.acked_generation, st.acked_seed), (st.pending_generation, st.pending_seed)] {
            if g != 0 && s as usize >= seeds.len() {
                return Err(format!("entry for LBA {lba} names seed #{s} of {}", seeds.len()));
            }
        }
        entries.push((lba, st));
    }
    Ok(VerifyState { block_bytes, nsid, subnqn, seeds, entries })
}

/// Reads a state file.
pub fn load(path: &Path) -> Result<VerifyState, PerfError> {
    let meta = std::fs::metadata(path).map_err(|e| PerfError::file(path, e))?;
    if meta.len() > VERIFY_STATE_BYTES_MAX {
        return Err(PerfError::bad_file(
            path,
            format!("{} bytes, larger than a verify state can be ({VERIFY_STATE_BYTES_MAX})", meta.len()),
        ));
    }
    let b = std::fs::read(path).map_err(|e| PerfError::file(path, e))?;
    decode(&b).map_err(|reason| PerfError::bad_file(path, format!("verify state: {reason}")))
}

/// Writes a state file atomically: a temporary file next to it, fsync, rename.
pub fn save(path: &Path, st: &VerifyState) -> Result<(), PerfError> {
    let bytes = encode(st);
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "verify-state".into());
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not every filesystem lets a directory be opened.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    };
    write().map_err(|e| PerfError::file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VerifyState {
        let e = |a, p, s| BlockState { acked_generation: a, pending_generation: p, acked_seed: s, pending_seed: s };
        VerifyState {
            block_bytes: 4096,
            nsid: 1,
            subnqn: "nqn.2026-11.dev.stager:default".into(),
            seeds: vec![11, 22],
            entries: vec![(0, e(1, 0, 0)), (7, e(3, 4, 1)), (1 << 40, e(0, 1, 1))],
        }
    }

    #[test]
    fn round_trip() {
        let st = sample();
        let b = encode(&st);
        assert_eq!(b.len(), 32 + st.subnqn.len() + 16 + 3 * 20 + 4);
        assert_eq!(decode(&b), Ok(st));
        assert_eq!(decode(&encode(&VerifyState::new(512, 9, ""))), Ok(VerifyState::new(512, 9, "")));
    }

    #[test]
    fn damage_is_detected() {
        let b = encode(&sample());
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x40;
            assert!(decode(&x).is_err(), "flip at byte {i} not detected");
        }
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "truncation to {n} bytes not detected");
        }
    }

    #[test]
    fn bad_content_with_good_checksum_is_rejected() {
        let mut st = sample();
        st.entries.swap(0, 1);
        assert!(decode(&encode(&st)).unwrap_err().contains("ascending"));
        let mut st = sample();
        st.entries[0].1.acked_seed = 5;
        assert!(decode(&encode(&st)).unwrap_err().contains("seed #5"));
        let mut st = sample();
        st.block_bytes = 1000;
        assert!(decode(&encode(&st)).unwrap_err().contains("power of two"));
    }

    #[test]
    fn save_and_load() {
        let dir = std::env::temp_dir().join(format!("stager-perf-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.bin");
        save(&p, &sample()).unwrap();
        assert_eq!(load(&p).unwrap(), sample());
        std::fs::write(&p, b"garbage").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("s.bin") && e.contains("verify state"), "{e}");
        let e = load(&dir.join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
