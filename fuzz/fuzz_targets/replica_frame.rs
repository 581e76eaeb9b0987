//! What a source writes into a replica's registered ring and what a replica writes back
//! (policy/src/replica/wire.rs), decoded as the replica's and the source's pollers decode them:
//! a record's fixed header, then its entry headers; an acknowledgement block; a publication
//! block; and the JSON control messages of a link's set-up (target/src/volume/replication.rs).
//! Checks, beyond "never panics":
//!
//! - a record header that decodes has a length that fits its entries' headers and at most its
//!   entries' largest data, a 64-byte aligned position and sequence numbers that do not wrap;
//! - entries that decode are exactly `count`, consecutive from `first_seq`, of the record's
//!   volume and epoch, and their encoded size is the record's length (so the ring bounds the
//!   replica checks next are the bounds of what it will read);
//! - re-encoding a decoded record head yields bytes that decode to the same record;
//! - acknowledgements and publications round-trip through their encoders.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_policy::replica::wire::{
    decode_record_entries, decode_record_header, encode_record_head, record_head_len, record_len, Ack, Publish,
    RECORD_ALIGN,
};
use stager_target::volume::replication::Ctl;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = decode_record_header(data) {
        assert!(h.count > 0 && h.pos % RECORD_ALIGN == 0 && h.len as u64 % RECORD_ALIGN == 0);
        assert!(h.len as usize >= record_head_len(&h));
        assert!(h.first_seq.0.checked_add(h.count as u64).is_some());
        if let Ok(entries) = decode_record_entries(&h, data) {
            assert_eq!(entries.len(), h.count as usize);
            assert_eq!(record_len(&entries), h.len as u64);
            for (i, e) in entries.iter().enumerate() {
                assert_eq!((e.volume, e.epoch, e.seq.0), (h.volume, h.epoch, h.first_seq.0 + i as u64));
            }
            let mut again = Vec::new();
            encode_record_head(&h, &entries, &mut again);
            let h2 = decode_record_header(&again).expect("a re-encoded head decodes");
            assert_eq!(h2, h);
            assert_eq!(decode_record_entries(&h2, &again).expect("its entries decode"), entries);
        }
    }
    if let Ok(a) = Ack::decode(data) {
        assert_eq!(Ack::decode(&a.encode()), Ok(a));
    }
    if let Ok(p) = Publish::decode(data) {
        assert_eq!(Publish::decode(&p.encode()), Ok(p));
    }
    if let Ok(m) = Ctl::decode(data) {
        let again = Ctl::decode(&m.encode()).expect("a re-encoded control message decodes");
        assert_eq!(format!("{again:?}"), format!("{m:?}"));
    }
});
