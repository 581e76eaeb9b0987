//! NVMe over Fabrics commands: Connect (command fields and its 1 KiB data), Property Get/Set,
//! and the controller properties (CAP, VS, CC, CSTS) that replace PCIe registers on fabrics.

use crate::command::{fctype, sgl, Command, FABRICS_OPCODE};
use crate::le;

/// Bytes of the Connect command's data (host id, controller id, NQNs).
pub const CONNECT_DATA_BYTES: usize = 1024;
/// Longest NQN the spec allows (the field is 256 bytes, NUL terminated).
pub const NQN_MAX_BYTES: usize = 223;

/// Property offsets.
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
}

/// NVMe version 1.4, as reported in VS and Identify Controller.
pub const VERSION_1_4: u32 = 0x0001_0400;

/// CC fields.
pub mod cc {
    pub const EN: u32 = 1;
    pub const SHN_SHIFT: u32 = 14;
    pub const SHN_MASK: u32 = 0x3 << 14;
    pub fn shn(cc: u32) -> u32 {
        (cc & SHN_MASK) >> SHN_SHIFT
    }
}

/// CSTS fields.
pub mod csts {
    pub const RDY: u32 = 1;
    pub const CFS: u32 = 1 << 1;
    pub const SHST_COMPLETE: u32 = 0x2 << 2;
}

/// CAP: MQES (0-based max queue entries), CQR=1, TO in 500 ms units, CSS=NVM, MPSMIN=0 (4 KiB).
/// `max_queue_depth` is the commands a queue may have outstanding; with SQ flow control a
/// queue of N entries holds N - 1, so the queue may have one entry more than that.
pub fn cap(max_queue_depth: u16) -> u64 {
    let mqes = max_queue_depth.max(1) as u64;
    let timeout_500ms = 30u64; // 15 s to become ready after CC.EN.
    mqes | (1 << 16) | (timeout_500ms << 24) | (1 << 37)
}

/// Fields of a Connect command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub qid: u16,
    /// Submission queue size, 0-based as on the wire (entries - 1).
    pub sqsize: u16,
    /// Connect attributes (bit 2: host asks to disable SQ flow control).
    pub cattr: u8,
    /// Keep-alive timeout in ms (admin queue only; 0 disables).
    pub kato_ms: u32,
    pub host_id: [u8; 16],
    /// 0xFFFF for the admin queue (dynamic model), the controller id for I/O queues.
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

impl Connect {
    /// Parses a Connect from its command and data; `None` if the data is not 1024 bytes.
    pub fn decode(cmd: &Command, data: &[u8]) -> Option<Connect> {
        if data.len() < CONNECT_DATA_BYTES {
            return None;
        }
        let b = &cmd.0;
        Some(Connect {
            qid: le::u16_at(b, 42),
            sqsize: le::u16_at(b, 44),
            cattr: b[46],
            kato_ms: le::u32_at(b, 48),
            host_id: data[0..16].try_into().ok()?,
            cntlid: le::u16_at(data, 16),
            subnqn: le::str_at(data, 256, 256),
            hostnqn: le::str_at(data, 512, 256),
        })
    }
    /// Record format in the command (must be 0).
    pub fn recfmt(cmd: &Command) -> u16 {
        le::u16_at(&cmd.0, 40)
    }

    /// Builds the command (with an in-capsule SGL) and its data.
    pub fn encode(&self, cid: u16) -> (Command, Vec<u8>) {
        let mut c = Command::new(FABRICS_OPCODE, cid);
        c.0[4] = fctype::CONNECT;
        le::put_u16(&mut c.0, 40, 0);
        le::put_u16(&mut c.0, 42, self.qid);
        le::put_u16(&mut c.0, 44, self.sqsize);
        c.0[46] = self.cattr;
        le::put_u32(&mut c.0, 48, self.kato_ms);
        c.set_sgl(sgl::IN_CAPSULE, 0, CONNECT_DATA_BYTES as u32);
        let mut d = vec![0u8; CONNECT_DATA_BYTES];
        d[0..16].copy_from_slice(&self.host_id);
        le::put_u16(&mut d, 16, self.cntlid);
        le::put_str_nul(&mut d, 256, 256, &self.subnqn);
        le::put_str_nul(&mut d, 512, 256, &self.hostnqn);
        (c, d)
    }
}

/// Property Get/Set fields: 8-byte access if `wide`, else 4-byte.
pub fn property_fields(cmd: &Command) -> (bool, u32, u64) {
    let wide = cmd.0[40] & 0x7 == 1;
    (wide, le::u32_at(&cmd.0, 44), le::u64_at(&cmd.0, 48))
}

pub fn property_get(cid: u16, offset: u32, wide: bool) -> Command {
    let mut c = Command::new(FABRICS_OPCODE, cid);
    c.0[4] = fctype::PROPERTY_GET;
    c.0[40] = wide as u8;
    le::put_u32(&mut c.0, 44, offset);
    c
}

pub fn property_set(cid: u16, offset: u32, value: u64, wide: bool) -> Command {
    let mut c = Command::new(FABRICS_OPCODE, cid);
    c.0[4] = fctype::PROPERTY_SET;
    c.0[40] = wide as u8;
    le::put_u32(&mut c.0, 44, offset);
    le::put_u64(&mut c.0, 48, value);
    c
}

/// Connect Invalid Parameters carries in DW0 which parameter was wrong: IATTR (bit 16: in
/// data, else in the command) and IPO (byte offset of the field).
pub fn invalid_param_dw0(in_data: bool, offset: u16) -> u32 {
    ((in_data as u32) << 16) | offset as u32
}

/// Offsets of Connect fields, for Connect Invalid Parameters' IPO.
pub mod connect_field {
    pub const RECFMT: u16 = 40;
    pub const QID: u16 = 42;
    pub const SQSIZE: u16 = 44;
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trip() {
        let c = Connect {
            qid: 3,
            sqsize: 127,
            cattr: 0,
            kato_ms: 5000,
            host_id: [7; 16],
            cntlid: 9,
            subnqn: "nqn.2026-11.dev.stager:x".into(),
            hostnqn: "nqn.2026-11.dev.stager:h".into(),
        };
        let (cmd, data) = c.encode(1);
        assert_eq!(Connect::decode(&cmd, &data), Some(c));
        assert_eq!(Connect::decode(&cmd, &data[..100]), None);
    }

    #[test]
    fn property_round_trip() {
        let c = property_set(1, prop::CC, 0x46_0001, false);
        assert_eq!(property_fields(&c), (false, prop::CC, 0x46_0001));
    }
}
