//! The fabric's wire formats, as pure encode/decode functions (fuzzed, see `fuzz/`): the
//! set-up handshake ([`setup`]) and the frames that follow it on the TCP connection ([`frame`]).

pub mod frame;
pub mod setup;
