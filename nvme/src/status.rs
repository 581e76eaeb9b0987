//! NVMe completion status: status code type (SCT) and status code (SC), with the codes the
//! target returns named after the base and fabrics specs. Every error path on the target maps
//! to one of these in exactly one place, so the status a host sees is the one the spec asks for.

use std::fmt;

/// A status as carried in bits 15:1 of a completion's status field (phase bit excluded).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    /// Do Not Retry: set for errors that retrying cannot fix.
    pub dnr: bool,
}

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    /// Path Related Status: the command may succeed through another controller (path), so a
    /// multipathing host fails it over rather than reporting it.
    pub const PATH: u8 = 3;
}

impl Status {
    pub const SUCCESS: Status = Status::generic(0x00);
    pub const INVALID_OPCODE: Status = Status::generic(0x01).no_retry();
    pub const INVALID_FIELD: Status = Status::generic(0x02).no_retry();
    pub const CID_CONFLICT: Status = Status::generic(0x03).no_retry();
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
    pub const INTERNAL_ERROR: Status = Status::generic(0x06);
    pub const ABORT_REQUESTED: Status = Status::generic(0x07);
    pub const SQ_DELETION: Status = Status::generic(0x08);
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0B).no_retry();
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::generic(0x0C).no_retry();
    pub const INVALID_SGL_DESCRIPTOR: Status = Status::generic(0x0D).no_retry();
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::generic(0x0F).no_retry();
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = Status::generic(0x11).no_retry();
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80).no_retry();
    pub const CAPACITY_EXCEEDED: Status = Status::generic(0x81).no_retry();
    pub const NAMESPACE_NOT_READY: Status = Status::generic(0x82);
    /// A transport error that a retry may fix (e.g. a data digest mismatch).
    pub const TRANSIENT_TRANSPORT_ERROR: Status = Status::generic(0x22);

    pub const INVALID_QUEUE_SIZE: Status = Status::specific(0x02).no_retry();
    pub const AER_LIMIT_EXCEEDED: Status = Status::specific(0x05).no_retry();
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09).no_retry();
    pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0D).no_retry();
    pub const FEATURE_NOT_CHANGEABLE: Status = Status::specific(0x0E).no_retry();
    /// Fabrics: Connect Incompatible Format.
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = Status::specific(0x80).no_retry();
    /// Fabrics: Connect Controller Busy.
    pub const CONNECT_CONTROLLER_BUSY: Status = Status::specific(0x81);
    /// Fabrics: Connect Invalid Parameters (DW0 says which).
    pub const CONNECT_INVALID_PARAMETERS: Status = Status::specific(0x82).no_retry();
    /// Fabrics: Connect Invalid Host — the host NQN may not use this subsystem.
    pub const CONNECT_INVALID_HOST: Status = Status::specific(0x84).no_retry();

    pub const WRITE_FAULT: Status = Status::media(0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(0x81);
    pub const COMPARE_FAILURE: Status = Status::media(0x85).no_retry();

    // Path related (Asymmetric Namespace Access): never DNR, so the host retries the command
    // on another path (Linux's native multipath fails over on SCT 3 unless DNR is set).
    /// The namespace's ANA group is in Persistent Loss through this controller.
    pub const ANA_PERSISTENT_LOSS: Status = Status::path(0x01);
    /// The namespace's ANA group is Inaccessible through this controller.
    pub const ANA_INACCESSIBLE: Status = Status::path(0x02);
    /// The namespace's ANA group is in transition (Change) through this controller.
    pub const ANA_TRANSITION: Status = Status::path(0x03);

    pub const fn generic(sc: u8) -> Status {
        Status { sct: sct::GENERIC, sc, dnr: false }
    }
    pub const fn specific(sc: u8) -> Status {
        Status { sct: sct::COMMAND_SPECIFIC, sc, dnr: false }
    }
    pub const fn media(sc: u8) -> Status {
        Status { sct: sct::MEDIA, sc, dnr: false }
    }
    pub const fn path(sc: u8) -> Status {
        Status { sct: sct::PATH, sc, dnr: false }
    }
    pub const fn no_retry(self) -> Status {
        Status { dnr: true, ..self }
    }

    /// A path-related status (SCT 3): the command may succeed on another path.
    pub fn is_path_error(&self) -> bool {
        self.sct == sct::PATH
    }

    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// Same code, ignoring DNR (tests compare codes; hosts decide on DNR).
    pub fn same_code(&self, other: Status) -> bool {
        self.sct == other.sct && self.sc == other.sc
    }

    /// Encodes into the 16-bit status field with the given phase bit.
    pub fn to_field(self, phase: bool) -> u16 {
        (phase as u16) | ((self.sc as u16) << 1) | (((self.sct & 0x7) as u16) << 9) | ((self.dnr as u16) << 15)
    }

    pub fn from_field(f: u16) -> Status {
        Status { sc: ((f >> 1) & 0xFF) as u8, sct: ((f >> 9) & 0x7) as u8, dnr: f & 0x8000 != 0 }
    }

    /// The spec's name for known codes.
    pub fn name(&self) -> &'static str {
        match (self.sct, self.sc) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x08) => "Command Aborted due to SQ Deletion",
            (0, 0x0B) => "Invalid Namespace or Format",
            (0, 0x0C) => "Command Sequence Error",
            (0, 0x0D) => "Invalid SGL Segment Descriptor",
            (0, 0x0F) => "Data SGL Length Invalid",
            (0, 0x11) => "SGL Descriptor Type Invalid",
            (0, 0x22) => "Transient Transport Error",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x05) => "Asynchronous Event Request Limit Exceeded",
            (1, 0x09) => "Invalid Log Page",
            (1, 0x0D) => "Feature Identifier Not Saveable",
            (1, 0x0E) => "Feature Not Changeable",
            (1, 0x80) => "Connect Incompatible Format",
            (1, 0x81) => "Connect Controller Busy",
            (1, 0x82) => "Connect Invalid Parameters",
            (1, 0x84) => "Connect Invalid Host",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x85) => "Compare Failure",
            (3, 0x01) => "Asymmetric Access Persistent Loss",
            (3, 0x02) => "Asymmetric Access Inaccessible",
            (3, 0x03) => "Asymmetric Access Transition",
            _ => "Unknown Status",
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (sct {:#x}, sc {:#04x}{})", self.name(), self.sct, self.sc, if self.dnr { ", dnr" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_round_trip() {
        for s in [
            Status::SUCCESS,
            Status::LBA_OUT_OF_RANGE,
            Status::CONNECT_INVALID_HOST,
            Status::COMPARE_FAILURE,
            Status::ANA_INACCESSIBLE,
        ] {
            for phase in [false, true] {
                let f = s.to_field(phase);
                assert_eq!(f & 1 == 1, phase);
                assert_eq!(Status::from_field(f), s);
            }
        }
    }

    #[test]
    fn ana_statuses_are_path_related_and_retryable() {
        // Status field bits: SC 8:1, SCT 11:9, DNR 15 (phase 0 excluded here).
        for (s, sc) in [(Status::ANA_PERSISTENT_LOSS, 1u16), (Status::ANA_INACCESSIBLE, 2), (Status::ANA_TRANSITION, 3)]
        {
            assert!(s.is_path_error() && !s.dnr, "{s}");
            assert_eq!(s.to_field(false), 3 << 9 | sc << 1);
        }
    }
}
