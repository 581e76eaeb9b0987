//! The fixed-layout NVMe structures that arrive from a peer: a 64-byte command (from a
//! CapsuleCmd) through every `Command` accessor; Connect data; Identify Namespace / Controller
//! data and namespace identification descriptors; the active namespace list; the discovery log,
//! the SMART log and the ANA log (with the asynchronous event word that announces it); a
//! completion (from a CapsuleResp) and its status.
//!
//! Input layout: the first 64 bytes are the command (zero-padded when the input is shorter);
//! everything after them is the data handed to every decoder, so empty, short, exact and long
//! buffers are all tried. Nothing may panic on any input; where a function has a documented
//! precondition it is respected here (named at the call). Round trips are checked where the
//! format keeps every field: setters/getters of `Command`, `Completion` and `Connect`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_nvme::command::Command;
use stager_nvme::completion::Completion;
use stager_nvme::constants::{CQE_BYTES, SQE_BYTES};
use stager_nvme::fabrics::{self, Connect, CONNECT_DATA_BYTES};
use stager_nvme::identify::{self, ControllerInfo, NamespaceIdentity};
use stager_nvme::log_page;
use stager_nvme::status::Status;

fuzz_target!(|input: &[u8]| {
    // Precondition: from_bytes takes at least SQE_BYTES.
    let mut raw = [0u8; SQE_BYTES];
    let n = input.len().min(SQE_BYTES);
    raw[..n].copy_from_slice(&input[..n]);
    let cmd = Command::from_bytes(&raw);
    let data = input.get(SQE_BYTES..).unwrap_or(&[]);
    command_accessors(cmd, data);
    connect(&cmd, data);
    identify(data);
    discovery_log(data);
    log_pages(data);
    completion(data);
});

fn command_accessors(cmd: Command, data: &[u8]) {
    let _ = format!("{cmd:?}");
    let (opc, fct, cid, nsid) = (cmd.opcode(), cmd.fctype(), cmd.cid(), cmd.nsid());
    assert_eq!((opc, cid), (cmd.0[0], u16::from_le_bytes([cmd.0[2], cmd.0[3]])));
    assert_eq!(fct, cmd.0[4]);
    let _ = (cmd.sgl_address(), cmd.sgl_length(), cmd.sgl_id(), cmd.slba(), cmd.fua());
    let nlb = cmd.nlb();
    assert!((1..=65536).contains(&nlb), "nlb {nlb} outside 1..=65536");
    let _ = (cmd.direction(true), cmd.direction(false));
    let _ = fabrics::property_fields(&cmd);
    let _ = Connect::recfmt(&cmd);
    // Precondition: cdw(n) takes n in 0..=15.
    for n in 0..16 {
        let _ = cmd.cdw(n);
    }
    assert_eq!(nsid, cmd.cdw(1));

    // Setters write exactly what getters read back, and leave the rest alone.
    let mut c = cmd;
    let word = |i: usize| data.get(i..i + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let (a, b) = (word(0), word(8));
    c.set_cid(a as u16);
    c.set_nsid((a >> 16) as u32);
    c.set_sgl(b as u8, a, (b >> 8) as u32);
    // Precondition: set_rw takes nlb in 1..=65536.
    let nlb = ((b >> 40) as u32 & 0xFFFF) + 1;
    c.set_rw(a.rotate_left(7), nlb);
    assert_eq!(c.cid(), a as u16);
    assert_eq!(c.nsid(), (a >> 16) as u32);
    assert_eq!((c.sgl_id(), c.sgl_address(), c.sgl_length()), (b as u8, a, (b >> 8) as u32));
    assert_eq!((c.slba(), c.nlb()), (a.rotate_left(7), nlb));
    assert_eq!(c.fua(), cmd.fua(), "set_rw changed FUA");
    assert_eq!(c.opcode(), cmd.opcode());
    assert_eq!(c.cdw(13), cmd.cdw(13));
}

fn connect(cmd: &Command, data: &[u8]) {
    let decoded = Connect::decode(cmd, data);
    assert_eq!(decoded.is_some(), data.len() >= CONNECT_DATA_BYTES, "Connect::decode on {} bytes", data.len());
    let Some(c) = decoded else { return };
    // Strings are NUL-terminated fields of 256 bytes read lossily; one that still fits is
    // written back byte for byte, so the round trip must be exact then.
    if c.subnqn.len() <= 256 && c.hostnqn.len() <= 256 {
        let (cmd2, data2) = c.encode(cmd.cid());
        assert_eq!(data2.len(), CONNECT_DATA_BYTES);
        assert_eq!(Connect::decode(&cmd2, &data2).as_ref(), Some(&c), "Connect round trip");
        assert_eq!(Connect::recfmt(&cmd2), 0);
    }
}

fn identify(data: &[u8]) {
    if let Some(ns) = NamespaceIdentity::decode(data) {
        assert!(ns.block_size.is_power_of_two() && (512..=65536).contains(&ns.block_size));
        let _ = ns.encode();
    }
    let descs = NamespaceIdentity::decode_descriptors(data);
    let used: usize = descs.iter().map(|(_, v)| 4 + v.len()).sum();
    assert!(used <= data.len(), "descriptors cover {used} bytes of {}", data.len());
    assert!(descs.iter().all(|(t, _)| *t != 0));
    if let Some(ci) = ControllerInfo::decode(data) {
        let _ = format!("{ci:?}");
        // MDTS is a power of two of 4 KiB pages, 0 meaning no limit: any limit is >= 4 KiB.
        if let Some(n) = ci.max_transfer_bytes() {
            assert!(n >= 4096, "MDTS {} gives a transfer limit of {n} bytes", ci.mdts);
        }
        let _ = ci.in_capsule_bytes();
    }
    let active = identify::decode_active_namespaces(data);
    assert!(active.len() <= data.len() / 4 && active.iter().all(|&n| n != 0));
}

fn discovery_log(data: &[u8]) {
    let Some((_generation, entries)) = log_page::decode_discovery_log(data) else {
        assert!(data.len() < 16);
        return;
    };
    let fit = data.len().saturating_sub(log_page::DISCOVERY_HEADER_BYTES) / log_page::DISCOVERY_ENTRY_BYTES;
    assert!(entries.len() <= fit, "{} entries decoded from room for {fit}", entries.len());
    for e in &entries {
        let _ = format!("{e:?}");
    }
}

fn log_pages(data: &[u8]) {
    // Its `unwrap_or([0; 16])` says a short buffer (a truncated Get Log Page) reads as 0.
    let _ = log_page::SmartLog::host_writes(data);
    // DiscoveryEntry::decode documents no minimum; decode_discovery_log hands it whole entries.
    if let Some(b) = data.get(..log_page::DISCOVERY_ENTRY_BYTES) {
        let _ = log_page::DiscoveryEntry::decode(b);
    }
    // The ANA log keeps every field it decodes: what decodes re-encodes to at most the bytes it
    // came from (the rest is a host's padding) and decodes to the same page.
    if let Ok(ana) = log_page::AnaLog::decode(data) {
        let page = ana.encode(false);
        assert!(page.len() <= data.len(), "{} bytes re-encoded from {}", page.len(), data.len());
        assert_eq!(log_page::AnaLog::decode(&page).as_ref(), Ok(&ana), "ANA log round trip");
    }
    if let Some(w) = data.get(..4) {
        let dw0 = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let (kind, info, lid) = log_page::async_event::decode(dw0);
        assert_eq!(log_page::async_event::encode(kind, info, lid), dw0 & 0x00FF_FF07);
    }
}

fn completion(data: &[u8]) {
    // Precondition (debug_assert in Completion::decode): at least CQE_BYTES.
    let Some(b) = data.get(..CQE_BYTES) else { return };
    let c = Completion::decode(b);
    let _ = (c.result64(), c.status.name(), c.status.is_success(), format!("{c:?} {}", c.status));
    let mut out = [0u8; CQE_BYTES];
    c.encode(&mut out);
    assert_eq!(Completion::decode(&out), c, "completion round trip");
    // Only the phase bit, and the CRD/M bits Status does not keep, may differ.
    let kept = !(1u16 | 0x7000);
    assert_eq!(out[..14], b[..14]);
    assert_eq!(
        u16::from_le_bytes([out[14], out[15]]) & kept,
        u16::from_le_bytes([b[14], b[15]]) & kept,
        "status field bits lost"
    );
    let s = Status::from_field(u16::from_le_bytes([b[14], b[15]]));
    assert_eq!(Status::from_field(s.to_field(true)), s);
}
