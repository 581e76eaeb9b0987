//! Log pages: the discovery log (what a discovery controller returns), SMART / health
//! information, error information and the changed namespace list.

use crate::le;

/// Log page identifiers.
pub mod lid {
    pub const ERROR_INFO: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
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

#[cfg(test)]
mod tests {
    use super::*;

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
