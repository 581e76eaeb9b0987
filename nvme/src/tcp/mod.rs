//! NVMe/TCP: the PDU wire format (`pdu`). The target's connection state machine lives in
//! `stager-target`, the host's in `crate::host`; both use this codec.

pub mod pdu;

pub use pdu::{decode, encode, DataHeader, Digests, Frame, Pdu, PduError, R2t, TermReq};

/// The port IANA assigned to NVMe/TCP I/O controllers (discovery uses 8009 or the same).
pub const DEFAULT_PORT: u16 = 4420;
