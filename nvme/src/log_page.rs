//! Log pages: the discovery log (what a discovery controller returns), SMART / health
//! information, error information, the changed namespace list and the Asymmetric Namespace
//! Access log (with the asynchronous event that announces its changes).

use crate::le;

/// Log page identifiers.
pub mod lid {
    pub const ERROR_INFO: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    pub const ANA: u8 = 0x0C;
    pub const DISCOVERY: u8 = 0x70;
}

pub const DISCOVERY_HEADER_BYTES: usize = 1024;
pub const DISCOVERY_ENTRY_BYTES: usize = 1024;

/// Subsystem types in a discovery log entry.
pub mod subtype {
    pub const DISCOVERY_REFERRAL: u8 = 1;
    pub const NVM: u8 = 2;
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// One discovery log page entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    /// 3 = TCP.
    pub trtype: u8,
    /// 1 = IPv4, 2 = IPv6.
    pub adrfam: u8,
    pub subtype: u8,
    pub portid: u16,
    pub trsvcid: String,
    pub subnqn: String,
    pub traddr: String,
}

impl DiscoveryEntry {
    pub fn encode(&self, out: &mut [u8]) {
        out[..DISCOVERY_ENTRY_BYTES].fill(0);
        out[0] = self.trtype;
        out[1] = self.adrfam;
        out[2] = self.subtype;
        out[3] = 0; // TREQ: secure channel not specified
        le::put_u16(out, 4, self.portid);
        le::put_u16(out, 6, 0xFFFF); // CNTLID: dynamic controller model
        le::put_u16(out, 8, 32); // ASQSZ
        le::put_str_padded(out, 32, 32, &self.trsvcid);
        le::put_str_nul(out, 256, 256, &self.subnqn);
        le::put_str_padded(out, 512, 256, &self.traddr);
        // TSAS for TCP: SECTYPE 0 (no security).
    }
    pub fn decode(b: &[u8]) -> DiscoveryEntry {
        DiscoveryEntry {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            portid: le::u16_at(b, 4),
            trsvcid: le::str_at(b, 32, 32),
            subnqn: le::str_at(b, 256, 256),
            traddr: le::str_at(b, 512, 256),
        }
    }
}

/// Encodes a whole discovery log (header + entries).
pub fn encode_discovery_log(generation: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; DISCOVERY_HEADER_BYTES + entries.len() * DISCOVERY_ENTRY_BYTES];
    le::put_u64(&mut b, 0, generation);
    le::put_u64(&mut b, 8, entries.len() as u64);
    le::put_u16(&mut b, 16, 0); // RECFMT
    for (i, e) in entries.iter().enumerate() {
        let off = DISCOVERY_HEADER_BYTES + i * DISCOVERY_ENTRY_BYTES;
        e.encode(&mut b[off..off + DISCOVERY_ENTRY_BYTES]);
    }
    b
}

/// Decodes (generation, entries) from a discovery log read in whole; entries that were cut
/// off by the buffer are ignored.
pub fn decode_discovery_log(b: &[u8]) -> Option<(u64, Vec<DiscoveryEntry>)> {
    if b.len() < 16 {
        return None;
    }
    let gen = le::u64_at(b, 0);
    let n = le::u64_at(b, 8) as usize;
    let entries = (0..n)
        .map(|i| DISCOVERY_HEADER_BYTES + i * DISCOVERY_ENTRY_BYTES)
        .take_while(|off| off + DISCOVERY_ENTRY_BYTES <= b.len())
        .map(|off| DiscoveryEntry::decode(&b[off..off + DISCOVERY_ENTRY_BYTES]))
        .collect();
    Some((gen, entries))
}

/// SMART / health information log (512 bytes).
#[derive(Clone, Debug, Default)]
pub struct SmartLog {
    pub critical_warning: u8,
    pub temperature_kelvin: u16,
    pub data_units_read: u128,
    pub data_units_written: u128,
    pub host_reads: u128,
    pub host_writes: u128,
    pub power_on_hours: u128,
    pub media_errors: u128,
    pub error_log_entries: u128,
}

impl SmartLog {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0] = self.critical_warning;
        le::put_u16(&mut b, 1, self.temperature_kelvin);
        b[3] = 100; // available spare %
        b[4] = 10; // spare threshold
        let mut put128 = |off: usize, v: u128| b[off..off + 16].copy_from_slice(&v.to_le_bytes());
        put128(32, self.data_units_read);
        put128(48, self.data_units_written);
        put128(64, self.host_reads);
        put128(80, self.host_writes);
        put128(128, self.power_on_hours);
        put128(160, self.media_errors);
        put128(176, self.error_log_entries);
        b
    }
    /// Host write commands from a SMART log read off the wire (0 if the buffer is short).
    pub fn host_writes(b: &[u8]) -> u128 {
        b.get(80..96).and_then(|f| f.try_into().ok()).map_or(0, u128::from_le_bytes)
    }
}

/// One error information log entry (64 bytes).
#[derive(Clone, Debug, Default)]
pub struct ErrorEntry {
    pub error_count: u64,
    pub sqid: u16,
    pub cid: u16,
    pub status_field: u16,
    pub lba: u64,
    pub nsid: u32,
}

impl ErrorEntry {
    pub fn encode(&self, out: &mut [u8]) {
        le::put_u64(out, 0, self.error_count);
        le::put_u16(out, 8, self.sqid);
        le::put_u16(out, 10, self.cid);
        le::put_u16(out, 12, self.status_field);
        le::put_u16(out, 14, 0xFFFF); // parameter error location: not specific
        le::put_u64(out, 16, self.lba);
        le::put_u32(out, 24, self.nsid);
    }
}

// ---- Asymmetric Namespace Access ---------------------------------------------------------
//
// Layout (NVMe base 2.0, "Asymmetric Namespace Access log page"):
//
// ```text
// header (16 bytes)        0..8  CHGCNT  u64  bumped whenever the log page changes
//                          8..10 NGRPS   u16  group descriptors that follow
//                          10..16 reserved
// group descriptor (32 + 4 * NNSIDS bytes, one after the other)
//                          0..4  ANAGRPID u32 (never 0)
//                          4..8  NNSIDS   u32 (0 when the host asked for groups only: RGO)
//                          8..16 CHGCNT   u64 bumped whenever this group's descriptor changes
//                          16    state    u8  bits 3:0 (AnaState)
//                          17..32 reserved
//                          32..  NSIDs    u32 each, ascending
// ```

/// The access state of an ANA group as seen through one controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnaState {
    Optimized = 0x01,
    NonOptimized = 0x02,
    Inaccessible = 0x03,
    PersistentLoss = 0x04,
    /// ANA transition: the group is changing state (the host waits up to ANATT).
    Change = 0x0F,
}

impl AnaState {
    pub const ALL: [AnaState; 5] = [
        AnaState::Optimized,
        AnaState::NonOptimized,
        AnaState::Inaccessible,
        AnaState::PersistentLoss,
        AnaState::Change,
    ];

    pub fn from_u8(v: u8) -> Option<AnaState> {
        AnaState::ALL.into_iter().find(|s| *s as u8 == v)
    }

    /// The name Linux shows in `/sys/.../ana_state` (and the one configuration and
    /// `stagerctl` use).
    pub fn name(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non-optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent-loss",
            AnaState::Change => "change",
        }
    }

    pub fn from_name(s: &str) -> Option<AnaState> {
        AnaState::ALL.into_iter().find(|a| a.name() == s)
    }

    /// The path-related status an I/O command gets through a controller that reports this
    /// state for the namespace's group; `None` when the path serves I/O.
    pub fn io_status(self) -> Option<crate::status::Status> {
        use crate::status::Status;
        match self {
            AnaState::Optimized | AnaState::NonOptimized => None,
            AnaState::Inaccessible => Some(Status::ANA_INACCESSIBLE),
            AnaState::PersistentLoss => Some(Status::ANA_PERSISTENT_LOSS),
            AnaState::Change => Some(Status::ANA_TRANSITION),
        }
    }
}

impl std::fmt::Display for AnaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub const ANA_HEADER_BYTES: usize = 16;
pub const ANA_GROUP_BYTES: usize = 32;

/// One ANA group descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaGroupDescriptor {
    pub group: u32,
    pub change_count: u64,
    pub state: AnaState,
    /// Ascending; empty in a groups-only (RGO) log.
    pub nsids: Vec<u32>,
}

/// A whole ANA log page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaLog {
    pub change_count: u64,
    pub groups: Vec<AnaGroupDescriptor>,
}

impl AnaLog {
    /// Encodes the page; with `groups_only` (Get Log Page LSP bit 0, RGO) no NSIDs are listed.
    pub fn encode(&self, groups_only: bool) -> Vec<u8> {
        let nsids: usize = if groups_only { 0 } else { self.groups.iter().map(|g| g.nsids.len()).sum() };
        let mut b = vec![0u8; ANA_HEADER_BYTES + self.groups.len() * ANA_GROUP_BYTES + nsids * 4];
        le::put_u64(&mut b, 0, self.change_count);
        le::put_u16(&mut b, 8, self.groups.len() as u16);
        let mut off = ANA_HEADER_BYTES;
        for g in &self.groups {
            let listed: &[u32] = if groups_only { &[] } else { &g.nsids };
            le::put_u32(&mut b, off, g.group);
            le::put_u32(&mut b, off + 4, listed.len() as u32);
            le::put_u64(&mut b, off + 8, g.change_count);
            b[off + 16] = g.state as u8;
            off += ANA_GROUP_BYTES;
            for n in listed {
                le::put_u32(&mut b, off, *n);
                off += 4;
            }
        }
        b
    }

    /// Decodes a page read off the wire. Anything malformed — a descriptor or NSID list cut
    /// off by the buffer, group id 0, an unknown state — is an error naming it, never a panic.
    pub fn decode(b: &[u8]) -> Result<AnaLog, String> {
        if b.len() < ANA_HEADER_BYTES {
            return Err(format!("ANA log of {} bytes is shorter than its header", b.len()));
        }
        let change_count = le::u64_at(b, 0);
        let ngrps = le::u16_at(b, 8) as usize;
        let mut groups = Vec::with_capacity(ngrps.min(b.len() / ANA_GROUP_BYTES));
        let mut off = ANA_HEADER_BYTES;
        for i in 0..ngrps {
            if b.len() < off + ANA_GROUP_BYTES {
                return Err(format!("ANA group descriptor {i} of {ngrps} is cut off at byte {off}"));
            }
            let group = le::u32_at(b, off);
            let count = le::u32_at(b, off + 4) as usize;
            let change = le::u64_at(b, off + 8);
            let raw = b[off + 16] & 0xF;
            if group == 0 {
                return Err(format!("ANA group descriptor {i} has group id 0"));
            }
            let state = AnaState::from_u8(raw).ok_or_else(|| format!("ANA group {group} has state {raw:#x}"))?;
            off += ANA_GROUP_BYTES;
            let end = count.checked_mul(4).and_then(|n| n.checked_add(off)).filter(|&e| e <= b.len());
            let Some(end) = end else {
                return Err(format!("ANA group {group} lists {count} NSIDs past the end of the log"));
            };
            let nsids = b[off..end].chunks_exact(4).map(|c| le::u32_at(c, 0)).collect();
            off = end;
            groups.push(AnaGroupDescriptor { group, change_count: change, state, nsids });
        }
        Ok(AnaLog { change_count, groups })
    }
}

/// Asynchronous event completions (Asynchronous Event Request, DW0).
pub mod async_event {
    /// Event type Notice.
    pub const TYPE_NOTICE: u8 = 0x2;
    /// Notice: Asymmetric Namespace Access change.
    pub const NOTICE_ANA_CHANGE: u8 = 0x03;
    /// Asynchronous Event Configuration (Set Features 0Bh) bit enabling ANA change notices,
    /// and the OAES bit of Identify Controller that says they are supported.
    pub const CONFIG_ANA_CHANGE: u32 = 1 << 11;

    /// DW0 of an AER completion: type (bits 2:0), information (15:8), log page (23:16).
    pub fn encode(kind: u8, info: u8, log_page: u8) -> u32 {
        (kind & 0x7) as u32 | (info as u32) << 8 | (log_page as u32) << 16
    }

    /// (type, information, log page) of an AER completion's DW0.
    pub fn decode(dw0: u32) -> (u8, u8, u8) {
        ((dw0 & 0x7) as u8, (dw0 >> 8) as u8, (dw0 >> 16) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ana_log_round_trip_groups_only_and_truncation() {
        let log = AnaLog {
            change_count: 9,
            groups: vec![
                AnaGroupDescriptor { group: 1, change_count: 3, state: AnaState::Optimized, nsids: vec![1, 2, 7] },
                AnaGroupDescriptor { group: 5, change_count: 1, state: AnaState::Inaccessible, nsids: vec![3] },
            ],
        };
        let b = log.encode(false);
        assert_eq!(b.len(), 16 + 2 * 32 + 4 * 4);
        assert_eq!((b[16 + 16], b[16 + 32 + 12 + 16]), (0x01, 0x03), "state bytes");
        assert_eq!(AnaLog::decode(&b).unwrap(), log);
        // Padded as a host's buffer would be: the zeroes after the page are ignored.
        let mut padded = b.clone();
        padded.resize(4096, 0);
        assert_eq!(AnaLog::decode(&padded).unwrap(), log);
        // Groups only: the same descriptors without NSIDs.
        let rgo = AnaLog::decode(&log.encode(true)).unwrap();
        assert_eq!(
            rgo.groups.iter().map(|g| (g.group, g.state, g.nsids.len())).collect::<Vec<_>>(),
            [(1, AnaState::Optimized, 0), (5, AnaState::Inaccessible, 0)]
        );
        // Every truncation is an error, never a panic.
        for cut in 0..b.len() {
            assert!(AnaLog::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        // Bad group id, bad state, an absurd NSID count.
        let mut bad = b.clone();
        bad[16..20].fill(0);
        assert!(AnaLog::decode(&bad).unwrap_err().contains("group id 0"));
        let mut bad = b.clone();
        bad[32] = 0x7;
        assert!(AnaLog::decode(&bad).unwrap_err().contains("state"));
        let mut bad = b;
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(AnaLog::decode(&bad).unwrap_err().contains("past the end"));
    }

    #[test]
    fn ana_states_and_async_event_words() {
        for s in AnaState::ALL {
            assert_eq!(AnaState::from_u8(s as u8), Some(s));
            assert_eq!(AnaState::from_name(s.name()), Some(s));
        }
        assert_eq!(AnaState::from_u8(0), None);
        assert_eq!(AnaState::Optimized.io_status(), None);
        assert_eq!(AnaState::Inaccessible.io_status(), Some(crate::status::Status::ANA_INACCESSIBLE));
        let dw0 = async_event::encode(async_event::TYPE_NOTICE, async_event::NOTICE_ANA_CHANGE, lid::ANA);
        assert_eq!(dw0, 0x000C_0302);
        assert_eq!(async_event::decode(dw0), (2, 3, 0x0C));
    }

    #[test]
    fn discovery_round_trip() {
        let e = DiscoveryEntry {
            trtype: 3,
            adrfam: 1,
            subtype: subtype::NVM,
            portid: 1,
            trsvcid: "4420".into(),
            subnqn: "nqn.2026-11.dev.stager:a".into(),
            traddr: "127.0.0.1".into(),
        };
        let log = encode_discovery_log(7, &[e.clone(), e.clone()]);
        let (gen, entries) = decode_discovery_log(&log).unwrap();
        assert_eq!(gen, 7);
        assert_eq!(entries, vec![e.clone(), e]);
        // A SMART log cut short by a peer reads as zero writes, never a panic (found by fuzzing).
        assert_eq!(SmartLog::host_writes(&[]), 0);
        assert_eq!(SmartLog::host_writes(&SmartLog { host_writes: 7, ..SmartLog::default() }.encode()), 7);
        // Truncated read: header only.
        assert_eq!(decode_discovery_log(&log[..1024]).unwrap().1.len(), 0);
    }
}
