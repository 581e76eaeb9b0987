//! Identify data structures (controller, namespace, active namespace list, namespace
//! identification descriptors): the target builds them from typed descriptions, the host
//! parses the fields it uses.

use crate::constants::IDENTIFY_BYTES;
use crate::le;

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NAMESPACES: u8 = 0x02;
    pub const NS_ID_DESCRIPTORS: u8 = 0x03;
}

/// Controller type in CNTRLTYPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControllerType {
    Io = 1,
    Discovery = 2,
}

/// What the target says about a controller.
#[derive(Clone, Debug)]
pub struct ControllerIdentity {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub cntlid: u16,
    pub controller_type: ControllerType,
    /// MDTS as a power of two of 4 KiB pages (0 = no limit).
    pub mdts: u8,
    pub max_cmd: u16,
    pub namespaces: u32,
    pub subnqn: String,
    /// Volatile write cache present.
    pub vwc: bool,
    /// In-capsule data bytes accepted on I/O queues.
    pub in_capsule_bytes: u32,
    /// Async event requests the controller holds at once.
    pub aer_limit: u8,
    /// Error log entries kept.
    pub error_log_entries: u8,
    /// Asymmetric Namespace Access reporting (NVM controllers of a multipath subsystem).
    pub ana: Option<AnaReporting>,
}

/// What a controller that reports Asymmetric Namespace Access says about it in Identify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnaReporting {
    /// ANATT: seconds a group may stay in the Change state before the host gives up on it.
    pub transition_time_s: u8,
    /// ANAGRPMAX and NANAGRPID: the highest group id, and how many groups, the subsystem may
    /// have. The same on every node, so every path of a subsystem describes it alike.
    pub group_id_max: u32,
    /// MNAN: namespaces the subsystem may have attached (non-zero and at most NN when ANA is
    /// reported; Linux refuses the controller otherwise).
    pub namespaces_max: u32,
}

/// CMIC (controller multi-path I/O and namespace sharing capabilities) bits.
pub mod cmic {
    pub const MULTI_PORT: u8 = 1 << 0;
    pub const MULTI_CONTROLLER: u8 = 1 << 1;
    pub const ANA_REPORTING: u8 = 1 << 3;
}

/// ANACAP: every state is reportable (bits 0-4) and a namespace's group id never changes while
/// it is attached (bit 6).
pub const ANACAP_ALL_STATES_STATIC_GROUPS: u8 = 0b0101_1111;

impl ControllerIdentity {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_BYTES];
        // PCI vendor id 0x1b36 (Red Hat/QEMU range) is not ours; 0 is "not reported".
        le::put_str_padded(&mut b, 4, 20, &self.serial);
        le::put_str_padded(&mut b, 24, 40, &self.model);
        le::put_str_padded(&mut b, 64, 8, &self.firmware);
        // Recommended arbitration burst.
        b[72] = 6;
        // CMIC: the subsystem may have several ports and controllers (the same NQN is served by
        // several nodes); bit 3 when the controller reports ANA.
        b[76] = cmic::MULTI_PORT | cmic::MULTI_CONTROLLER;
        if self.ana.is_some() {
            b[76] |= cmic::ANA_REPORTING;
        }
        b[77] = self.mdts;
        le::put_u16(&mut b, 78, self.cntlid);
        le::put_u32(&mut b, 80, crate::fabrics::VERSION_1_4);
        // OAES bit 8: namespace attribute notices (changed namespace list); bit 11: ANA change
        // notices.
        if self.controller_type == ControllerType::Io {
            let ana_notices = if self.ana.is_some() { crate::log_page::async_event::CONFIG_ANA_CHANGE } else { 0 };
            le::put_u32(&mut b, 92, 1 << 8 | ana_notices);
        }
        b[111] = self.controller_type as u8;
        b[258] = 3; // ACL: 4 concurrent aborts (0-based)
        b[259] = self.aer_limit.saturating_sub(1); // AERL, 0-based
        b[260] = 0b11; // FRMW: slot 1 read-only, 1 slot
        b[261] = 1 << 2 | 1 << 1; // LPA: extended data for Get Log Page, command effects
        b[262] = self.error_log_entries.saturating_sub(1); // ELPE, 0-based
        le::put_u16(&mut b, 320, 10); // KAS: keep-alive granularity 1 s (100 ms units)
        if let Some(a) = &self.ana {
            b[342] = a.transition_time_s; // ANATT
            b[343] = ANACAP_ALL_STATES_STATIC_GROUPS;
            le::put_u32(&mut b, 344, a.group_id_max); // ANAGRPMAX
            le::put_u32(&mut b, 348, a.group_id_max); // NANAGRPID
            le::put_u32(&mut b, 540, a.namespaces_max.min(self.namespaces)); // MNAN
        }
        b[512] = 0x66; // SQES: 64 bytes
        b[513] = 0x44; // CQES: 16 bytes
        le::put_u16(&mut b, 514, self.max_cmd);
        le::put_u32(&mut b, 516, self.namespaces);
        if self.controller_type == ControllerType::Io {
            // ONCS: compare (0), dataset management (2), write zeroes (3).
            le::put_u16(&mut b, 520, 1 | 1 << 2 | 1 << 3);
        }
        b[525] = self.vwc as u8;
        // SGLS: SGLs supported (bit 0), keyed (bit 2, harmless on TCP), offset in capsule (bit 20).
        le::put_u32(&mut b, 536, 1 | 1 << 20);
        le::put_str_nul(&mut b, 768, 256, &self.subnqn);
        // IOCCSZ / IORCSZ in 16-byte units; ICDOFF 0; FCATT 0 (dynamic); MSDBD 1.
        le::put_u32(&mut b, 1792, (64 + self.in_capsule_bytes) / 16);
        le::put_u32(&mut b, 1796, 1);
        b[1803] = 1;
        // Power state 0: 25 W max, entry/exit latency unreported.
        le::put_u16(&mut b, 2048, 2500);
        b
    }
}

/// The fields a host reads from Identify Controller.
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub mdts: u8,
    pub cntlid: u16,
    pub version: u32,
    pub controller_type: u8,
    pub namespaces: u32,
    pub oncs: u16,
    pub vwc: bool,
    pub ioccsz: u32,
    pub subnqn: String,
    pub max_cmd: u16,
    pub cmic: u8,
    pub oaes: u32,
    pub anatt: u8,
    pub anacap: u8,
    pub anagrpmax: u32,
    pub nanagrpid: u32,
    pub mnan: u32,
}

impl ControllerInfo {
    pub fn decode(b: &[u8]) -> Option<ControllerInfo> {
        if b.len() < IDENTIFY_BYTES {
            return None;
        }
        Some(ControllerInfo {
            serial: le::str_at(b, 4, 20),
            model: le::str_at(b, 24, 40),
            firmware: le::str_at(b, 64, 8),
            mdts: b[77],
            cntlid: le::u16_at(b, 78),
            version: le::u32_at(b, 80),
            controller_type: b[111],
            namespaces: le::u32_at(b, 516),
            oncs: le::u16_at(b, 520),
            vwc: b[525] & 1 != 0,
            ioccsz: le::u32_at(b, 1792),
            subnqn: le::str_at(b, 768, 256),
            max_cmd: le::u16_at(b, 514),
            cmic: b[76],
            oaes: le::u32_at(b, 92),
            anatt: b[342],
            anacap: b[343],
            anagrpmax: le::u32_at(b, 344),
            nanagrpid: le::u32_at(b, 348),
            mnan: le::u32_at(b, 540),
        })
    }
    /// Largest transfer in bytes (None = unlimited). MDTS comes from the peer: a value too
    /// large to represent means "more than we could ever send", not a panic.
    pub fn max_transfer_bytes(&self) -> Option<usize> {
        (self.mdts != 0).then(|| 1usize.checked_shl(12 + u32::from(self.mdts)).unwrap_or(usize::MAX))
    }
    /// In-capsule data bytes the controller accepts on I/O queues.
    pub fn in_capsule_bytes(&self) -> usize {
        (self.ioccsz as usize * 16).saturating_sub(64)
    }
}

/// What the target says about a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceIdentity {
    pub blocks: u64,
    pub block_size: u32,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
    /// ANAGRPID: the ANA group the namespace belongs to (0 = none reported).
    pub ana_group: u32,
    /// NMIC bit 0: the namespace may be attached to several controllers at once (a multipath
    /// host merges the paths only when it is set).
    pub shared: bool,
}

impl NamespaceIdentity {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_BYTES];
        le::put_u64(&mut b, 0, self.blocks); // NSZE
        le::put_u64(&mut b, 8, self.blocks); // NCAP
        le::put_u64(&mut b, 16, self.blocks); // NUSE
        b[24] = 1 << 2; // NSFEAT: NAWUN/NAWUPF/NACWU... not reported; bit 2: deallocated or unwritten error reporting
        b[25] = 0; // NLBAF: one format (0-based)
        b[26] = 0; // FLBAS: format 0
        b[30] = self.shared as u8; // NMIC
        b[33] = 0b1001; // DLFEAT: deallocated blocks read zeroes; Write Zeroes deallocates
        le::put_u32(&mut b, 92, self.ana_group); // ANAGRPID
        b[104..120].copy_from_slice(&self.nguid);
        let lbads = self.block_size.trailing_zeros();
        le::put_u32(&mut b, 128, lbads << 16); // LBAF0: no metadata, best performance
        b
    }

    pub fn decode(b: &[u8]) -> Option<NamespaceIdentity> {
        if b.len() < IDENTIFY_BYTES {
            return None;
        }
        let flbas = (b[26] & 0xF) as usize;
        let lbaf = le::u32_at(b, 128 + flbas * 4);
        let lbads = (lbaf >> 16) & 0xFF;
        if !(9..=16).contains(&lbads) {
            return None;
        }
        Some(NamespaceIdentity {
            blocks: le::u64_at(b, 0),
            block_size: 1 << lbads,
            nguid: b[104..120].try_into().ok()?,
            uuid: [0; 16],
            ana_group: le::u32_at(b, 92),
            shared: b[30] & 1 != 0,
        })
    }

    /// Namespace identification descriptor list (CNS 3): NGUID and UUID.
    pub fn encode_descriptors(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_BYTES];
        b[0] = 2; // NIDT NGUID
        b[1] = 16;
        b[4..20].copy_from_slice(&self.nguid);
        b[20] = 3; // NIDT UUID
        b[21] = 16;
        b[24..40].copy_from_slice(&self.uuid);
        b
    }

    /// Returns (type, value) pairs from a descriptor list.
    pub fn decode_descriptors(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        while off + 4 <= b.len() {
            let (nidt, nidl) = (b[off], b[off + 1] as usize);
            if nidt == 0 || off + 4 + nidl > b.len() {
                break;
            }
            out.push((nidt, b[off + 4..off + 4 + nidl].to_vec()));
            off += 4 + nidl;
        }
        out
    }
}

/// The fields a driver of a local NVMe namespace reads from Identify Namespace: its size and
/// the format in use. Decoded from what a device returns, so nothing here trusts it: a format
/// index or LBA size out of range is `None`, not a panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceFormat {
    /// NSZE: size in logical blocks.
    pub blocks: u64,
    /// LBA data size of the format in use.
    pub lba_bytes: u32,
    /// Metadata bytes per block of the format in use (0 for none).
    pub metadata_bytes: u16,
    /// FLBAS bit 4: metadata travels at the end of each block's data (extended LBA).
    pub extended_lba: bool,
    /// DLFEAT bits 2:0 = 001b: a deallocated block reads as zeroes.
    pub deallocated_reads_zeroes: bool,
}

impl NamespaceFormat {
    pub fn decode(b: &[u8]) -> Option<NamespaceFormat> {
        if b.len() < IDENTIFY_BYTES {
            return None;
        }
        let nlbaf = b[25] as usize;
        // FLBAS bits 3:0, plus bits 6:5 as the high bits when more than 16 formats exist.
        let flbas = b[26];
        let index = (flbas & 0xF) as usize | (((flbas >> 5) & 0x3) as usize) << 4;
        if index > nlbaf || index >= 64 {
            return None;
        }
        let lbaf = le::u32_at(b, 128 + index * 4);
        let lbads = (lbaf >> 16) & 0xFF;
        if !(9..=16).contains(&lbads) {
            return None;
        }
        Some(NamespaceFormat {
            blocks: le::u64_at(b, 0),
            lba_bytes: 1 << lbads,
            metadata_bytes: (lbaf & 0xFFFF) as u16,
            extended_lba: flbas & (1 << 4) != 0,
            deallocated_reads_zeroes: b[33] & 0x7 == 1,
        })
    }
}

/// Active namespace list: NSIDs greater than `after`, ascending, at most 1024.
pub fn encode_active_namespaces(nsids: &[u32], after: u32) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_BYTES];
    for (i, nsid) in nsids.iter().filter(|&&n| n > after).take(IDENTIFY_BYTES / 4).enumerate() {
        le::put_u32(&mut b, i * 4, *nsid);
    }
    b
}

pub fn decode_active_namespaces(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| le::u32_at(c, 0)).take_while(|&n| n != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_round_trip() {
        let ns = NamespaceIdentity {
            blocks: 262144,
            block_size: 4096,
            nguid: [1; 16],
            uuid: [2; 16],
            ana_group: 3,
            shared: true,
        };
        let d = NamespaceIdentity::decode(&ns.encode()).unwrap();
        assert_eq!((d.blocks, d.block_size, d.nguid), (ns.blocks, ns.block_size, ns.nguid));
        assert_eq!((d.ana_group, d.shared), (3, true));
        let descs = NamespaceIdentity::decode_descriptors(&ns.encode_descriptors());
        assert_eq!(descs, vec![(2, vec![1; 16]), (3, vec![2; 16])]);
    }

    #[test]
    fn namespace_format_of_a_device() {
        let ns = NamespaceIdentity {
            blocks: 1 << 21,
            block_size: 512,
            nguid: [0; 16],
            uuid: [0; 16],
            ana_group: 0,
            shared: false,
        };
        let mut b = ns.encode();
        let f = NamespaceFormat::decode(&b).unwrap();
        assert_eq!((f.blocks, f.lba_bytes, f.metadata_bytes, f.extended_lba), (1 << 21, 512, 0, false));
        assert!(f.deallocated_reads_zeroes);
        // Format 1 in use: 4 KiB with 8 bytes of metadata.
        b[25] = 1;
        b[26] = 1;
        le::put_u32(&mut b, 132, 12 << 16 | 8);
        let f = NamespaceFormat::decode(&b).unwrap();
        assert_eq!((f.lba_bytes, f.metadata_bytes), (4096, 8));
        // A format index beyond NLBAF, or an LBA size out of range, is refused.
        b[26] = 2;
        assert_eq!(NamespaceFormat::decode(&b), None);
        b[26] = 1;
        le::put_u32(&mut b, 132, 40 << 16);
        assert_eq!(NamespaceFormat::decode(&b), None);
        assert_eq!(NamespaceFormat::decode(&b[..100]), None);
    }

    #[test]
    fn active_list() {
        let b = encode_active_namespaces(&[1, 2, 5], 1);
        assert_eq!(decode_active_namespaces(&b), vec![2, 5]);
    }

    #[test]
    fn controller_round_trip() {
        let id = ControllerIdentity {
            serial: "S1".into(),
            model: "Stager".into(),
            firmware: "0.1".into(),
            cntlid: 5,
            controller_type: ControllerType::Io,
            mdts: 8,
            max_cmd: 128,
            namespaces: 4,
            subnqn: "nqn.x:y".into(),
            vwc: true,
            in_capsule_bytes: 8192,
            aer_limit: 4,
            error_log_entries: 16,
            ana: None,
        };
        let c = ControllerInfo::decode(&id.encode()).unwrap();
        assert_eq!((c.cmic, c.anagrpmax, c.mnan), (0b11, 0, 0), "no ANA fields without ANA reporting");
        assert_eq!(c.serial, "S1");
        assert_eq!(c.max_transfer_bytes(), Some(1 << 20));
        assert_eq!(c.in_capsule_bytes(), 8192);
        assert_eq!(c.subnqn, "nqn.x:y");
        assert_eq!(c.cntlid, 5);
        let ana = AnaReporting { transition_time_s: 10, group_id_max: 128, namespaces_max: 1024 };
        let c = ControllerInfo::decode(&ControllerIdentity { ana: Some(ana), ..id }.encode()).unwrap();
        assert_eq!(c.cmic, 0b1011, "multi-port, multi-controller, ANA reporting");
        assert_eq!(c.oaes, 1 << 8 | 1 << 11);
        assert_eq!((c.anatt, c.anacap, c.anagrpmax, c.nanagrpid), (10, 0b0101_1111, 128, 128));
        // MNAN must not exceed NN (4 here), or Linux refuses the controller.
        assert_eq!(c.mnan, 4);
    }

    #[test]
    fn mdts_from_a_hostile_peer_does_not_overflow() {
        // Found by fuzz/fuzz_targets/command_fields.rs (fuzz/regressions/command_fields/).
        let mut b = vec![0u8; 4096];
        for mdts in [52u8, 63, 64, 255] {
            b[77] = mdts;
            let c = ControllerInfo::decode(&b).unwrap();
            assert_eq!(c.max_transfer_bytes(), Some(usize::MAX), "mdts {mdts}");
        }
    }
}
