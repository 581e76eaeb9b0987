//! The send side of one NVMe/TCP connection: the byte stream to the host as a queue of
//! segments — encoded PDU headers and small payloads in reusable byte vectors, read data in
//! the I/O buffer it was read into or lent by the device — sent with one `sendmsg` gathering
//! up to `TX_IOV_MAX` segments whenever the previous send finished. Everything a reactor poll
//! queued for a connection therefore leaves in one system call, and read data is never copied
//! in user space.
//!
//! Positions: every byte queued has a position in the stream (`position`), and the queue
//! counts the bytes the socket took (`sent_bytes`). The connection uses them to hold a
//! request's slot until its response has really left — the bound that back-pressures a host
//! which does not read its responses.
//!
//! **Zero-copy sends.** When enabled for the connection (not on loopback, where the kernel
//! copies anyway — a "deferred copy" that only adds the notification's cost), a send that
//! carries at least `ZC_SEND_MIN_BYTES` of read data goes out as `IORING_OP_SENDMSG_ZC`: the
//! NIC reads the I/O buffer itself. Its buffers stay busy until the kernel's notification, so
//! segments retired while any zero-copy send is unacknowledged are held (tagged with the newest
//! zero-copy send) and released once every such send up to the tag has been notified. The held
//! bytes are capped (`ZC_HOLD_BYTES_MAX`); past the cap, sends copy until notifications catch
//! up. A kernel that refuses the operation turns it off for the connection.

use std::collections::VecDeque;

use io_uring::{opcode, squeue, types};
use stager_nvme::bdev::{AlignedBuf, BufPool, LentBuf};
use stager_nvme::uring::{kind, user_data, ZC_MORE};

use crate::constants::{
    TX_IOV_MAX, TX_SEGMENT_BYTES, TX_SPARE_MAX, ZC_HOLD_BYTES_MAX, ZC_NOTIFS_MAX, ZC_SEND_MIN_BYTES,
};

/// A piece of the byte stream to the host.
pub enum TxSeg {
    /// Encoded PDU headers and small payloads.
    Bytes(Vec<u8>),
    /// A read's data, sent from its I/O buffer and returned to the pool once sent.
    Buf(AlignedBuf, usize),
    /// A read's data lent by the device (memory namespace), released once sent.
    Lent(LentBuf),
}

impl TxSeg {
    /// The bytes this segment puts on the wire.
    pub fn data(&self) -> &[u8] {
        match self {
            TxSeg::Bytes(v) => v,
            TxSeg::Buf(b, n) => &b[..*n],
            TxSeg::Lent(l) => l,
        }
    }
    fn is_data(&self) -> bool {
        !matches!(self, TxSeg::Bytes(_))
    }
}

/// Zero-copy bookkeeping.
struct ZeroCopy {
    enabled: bool,
    /// Generation of the next zero-copy send.
    next_gen: u64,
    /// Zero-copy sends whose notification has not arrived, oldest first.
    outstanding: VecDeque<u64>,
    /// Retired segments the kernel may still read, tagged with the newest zero-copy send at the
    /// time they were retired.
    hold: VecDeque<(u64, TxSeg)>,
    held_bytes: usize,
}

pub struct TxQueue {
    /// Segments queued for the socket, oldest first. Those in the send in flight must not move
    /// or change until it completes: segments are only appended, and retired in `on_sent`.
    queue: VecDeque<TxSeg>,
    /// Bytes of the front segment already sent.
    head_off: usize,
    /// PDU bytes being encoded; becomes a segment when data or a send needs it.
    pub next: Vec<u8>,
    /// Emptied byte segments, reused so queuing does not allocate.
    spare: Vec<Vec<u8>>,
    /// Bytes ever moved into `queue`, and bytes the socket ever took.
    sealed: u64,
    sent: u64,
    /// The iovec array and message header of the send in flight (stable addresses).
    iov: Box<[libc::iovec; TX_IOV_MAX]>,
    msg: Box<libc::msghdr>,
    /// A send is in flight; `Some(gen)` when it is a zero-copy one.
    in_flight: Option<Option<u64>>,
    zc: ZeroCopy,
    /// Read data bytes sent zero-copy and not yet counted in the target's statistics.
    zc_bytes: u64,
}

impl TxQueue {
    pub fn new(zero_copy: bool) -> TxQueue {
        TxQueue {
            queue: VecDeque::new(),
            head_off: 0,
            next: Vec::with_capacity(TX_SEGMENT_BYTES),
            spare: Vec::new(),
            sealed: 0,
            sent: 0,
            iov: Box::new([libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; TX_IOV_MAX]),
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
            msg: Box::new(unsafe { std::mem::zeroed() }),
            in_flight: None,
            zc: ZeroCopy {
                enabled: zero_copy,
                next_gen: 0,
                outstanding: VecDeque::new(),
                hold: VecDeque::new(),
                held_bytes: 0,
            },
            zc_bytes: 0,
        }
    }

    /// Whether zero-copy bytes were sent since `take_zero_copy_bytes` last ran.
    pub fn has_zero_copy_bytes(&self) -> bool {
        self.zc_bytes > 0
    }

    /// Zero-copy bytes sent since the last call.
    pub fn take_zero_copy_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.zc_bytes)
    }

    /// The stream position just past everything queued so far.
    pub fn position(&self) -> u64 {
        self.sealed + self.next.len() as u64
    }

    /// Bytes the socket has taken so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent
    }

    /// Bytes queued and not yet taken by the socket.
    pub fn backlog(&self) -> u64 {
        self.position() - self.sent
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Zero-copy sends whose buffers the kernel may still use.
    #[cfg(test)]
    fn zero_copy_pending(&self) -> bool {
        !self.zc.outstanding.is_empty()
    }

    /// Moves encoded bytes into the queue (before a data segment, or before a send).
    fn seal(&mut self) {
        if !self.next.is_empty() {
            let next = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(TX_SEGMENT_BYTES));
            let full = std::mem::replace(&mut self.next, next);
            self.sealed += full.len() as u64;
            self.queue.push_back(TxSeg::Bytes(full));
        }
    }

    /// Queues a data segment after the bytes encoded so far.
    pub fn push(&mut self, seg: TxSeg) {
        self.seal();
        self.sealed += seg.data().len() as u64;
        self.queue.push_back(seg);
    }

    /// The send of everything queued (up to `TX_IOV_MAX` segments), or `None` when there is
    /// nothing to send or a send is in flight. `conn` goes into the completion's `user_data`.
    pub fn prepare(&mut self, fd: types::Fd, conn: u32) -> Option<squeue::Entry> {
        if self.in_flight.is_some() {
            return None;
        }
        self.seal();
        if self.queue.is_empty() {
            return None;
        }
        let n = self.queue.len().min(TX_IOV_MAX);
        let mut data_bytes = 0;
        for (i, seg) in self.queue.iter().take(n).enumerate() {
            let b = if i == 0 { &seg.data()[self.head_off..] } else { seg.data() };
            self.iov[i] = libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() };
            if seg.is_data() {
                data_bytes += b.len();
            }
        }
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = n as _;
        let zc = self.zc.enabled
            && data_bytes >= ZC_SEND_MIN_BYTES
            && self.zc.outstanding.len() < ZC_NOTIFS_MAX
            && self.zc.held_bytes < ZC_HOLD_BYTES_MAX;
        let msg = &*self.msg as *const libc::msghdr;
        let e = if zc {
            let gen = self.zc.next_gen;
            self.zc.next_gen += 1;
            self.in_flight = Some(Some(gen));
            let b = (gen as u32) & !ZC_MORE;
            opcode::SendMsgZc::new(fd, msg).flags(libc::MSG_NOSIGNAL as u32).build().user_data(user_data(
                kind::SOCKET_SEND_ZC,
                conn,
                b,
            ))
        } else {
            self.in_flight = Some(None);
            opcode::SendMsg::new(fd, msg).flags(libc::MSG_NOSIGNAL as u32).build().user_data(user_data(
                kind::SOCKET_SEND,
                conn,
                0,
            ))
        };
        Some(e)
    }

    /// The send in flight completed with `res` (bytes or -errno); `more`: a zero-copy
    /// notification will follow. Retires what was sent. Returns the errno of a failed send.
    pub fn on_sent(&mut self, res: i32, more: bool, pool: &mut BufPool) -> Result<(), i32> {
        let Some(zc_gen) = self.in_flight.take() else { return Ok(()) };
        if let Some(gen) = zc_gen {
            if more {
                self.zc.outstanding.push_back(gen);
            }
            if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
                // This kernel (or socket) does not do zero-copy sends: copy from now on.
                self.zc.enabled = false;
                return Ok(());
            }
            self.zc_bytes += res.max(0) as u64;
        }
        if res < 0 {
            return Err(-res);
        }
        self.sent += res as u64;
        let mut sent = res as usize;
        // A segment retired while any zero-copy send may still read it is held.
        let hold_tag = self.zc.outstanding.back().copied();
        while sent > 0 {
            let Some(front) = self.queue.front() else { break };
            let left = front.data().len() - self.head_off;
            if sent < left {
                self.head_off += sent;
                break;
            }
            sent -= left;
            self.head_off = 0;
            if let Some(seg) = self.queue.pop_front() {
                match hold_tag {
                    Some(tag) => {
                        self.zc.held_bytes += seg.data().len();
                        self.zc.hold.push_back((tag, seg));
                    }
                    None => self.recycle(seg, pool),
                }
            }
        }
        Ok(())
    }

    /// A zero-copy notification for the send whose `b` was `gen_bits`.
    pub fn on_notif(&mut self, gen_bits: u32, pool: &mut BufPool) {
        if let Some(i) = self.zc.outstanding.iter().position(|g| (*g as u32) & !ZC_MORE == gen_bits) {
            self.zc.outstanding.remove(i);
        }
        // Everything tagged below the oldest unnotified send is free.
        let oldest = self.zc.outstanding.front().copied().unwrap_or(u64::MAX);
        while self.zc.hold.front().is_some_and(|(tag, _)| *tag < oldest) {
            if let Some((_, seg)) = self.zc.hold.pop_front() {
                self.zc.held_bytes -= seg.data().len();
                self.recycle(seg, pool);
            }
        }
    }

    fn recycle(&mut self, seg: TxSeg, pool: &mut BufPool) {
        match seg {
            TxSeg::Bytes(mut v) => {
                if self.spare.len() < TX_SPARE_MAX {
                    v.clear();
                    self.spare.push(v);
                }
            }
            TxSeg::Buf(b, _) => pool.put(b),
            TxSeg::Lent(_) => {}
        }
    }

    /// Gives every buffer back (the connection is being dropped; no send is in flight). Held
    /// zero-copy buffers are freed too: the kernel keeps its own references to their pages.
    pub fn release(&mut self, pool: &mut BufPool) {
        while let Some(seg) = self.queue.pop_front() {
            self.recycle(seg, pool);
        }
        while let Some((_, seg)) = self.zc.hold.pop_front() {
            // Not back to the pool: the kernel may still be sending from them.
            drop(seg);
        }
        self.zc.held_bytes = 0;
        self.spare.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut TxQueue, pool: &mut BufPool, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while q.prepare(types::Fd(-1), 0).is_some() {
            // Stand-in for the kernel: take up to `chunk` bytes of the gathered iovecs.
            let mut n = 0;
            for i in 0..q.msg.msg_iovlen {
                let v = q.iov[i];
                // SAFETY: the iovec points into a segment the queue keeps alive until on_sent.
                let b = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                let take = b.len().min(chunk - n);
                out.extend_from_slice(&b[..take]);
                n += take;
                if n == chunk {
                    break;
                }
            }
            q.on_sent(n as i32, false, pool).unwrap();
        }
        out
    }

    #[test]
    fn partial_sends_keep_the_stream_in_order() {
        let mut pool = BufPool::new(8);
        let mut q = TxQueue::new(false);
        let mut want = Vec::new();
        for i in 0..200u32 {
            q.next.extend_from_slice(&i.to_le_bytes());
            want.extend_from_slice(&i.to_le_bytes());
            if i % 3 == 0 {
                let mut b = pool.get(100);
                b.fill(i as u8);
                want.extend_from_slice(&b);
                q.push(TxSeg::Buf(b, 100));
            }
        }
        assert_eq!(q.position(), want.len() as u64);
        let got = drain(&mut q, &mut pool, 37);
        assert_eq!(got, want);
        assert_eq!(q.sent_bytes(), want.len() as u64);
        assert_eq!(q.backlog(), 0);
    }

    #[test]
    fn zero_copy_buffers_are_held_until_notified() {
        let mut pool = BufPool::new(8);
        let mut q = TxQueue::new(true);
        q.next.extend_from_slice(b"hdr");
        q.push(TxSeg::Buf(pool.get(ZC_SEND_MIN_BYTES), ZC_SEND_MIN_BYTES));
        let e = q.prepare(types::Fd(-1), 3).expect("a send");
        assert_eq!(e.get_user_data() >> 56, kind::SOCKET_SEND_ZC as u64);
        let total = 3 + ZC_SEND_MIN_BYTES;
        q.on_sent(total as i32, true, &mut pool).unwrap();
        assert!(q.zero_copy_pending());
        assert_eq!(q.zc.hold.len(), 2, "sent segments must wait for the notification");
        // A small send meanwhile is not zero-copy, but its segment is held behind the first.
        q.next.extend_from_slice(b"resp");
        let e = q.prepare(types::Fd(-1), 3).expect("a send");
        assert_eq!(e.get_user_data() >> 56, kind::SOCKET_SEND as u64);
        q.on_sent(4, false, &mut pool).unwrap();
        assert_eq!(q.zc.hold.len(), 3);
        q.on_notif(0, &mut pool);
        assert!(!q.zero_copy_pending());
        assert_eq!(q.zc.hold.len(), 0);
        assert_eq!(q.zc.held_bytes, 0);
        // A kernel without zero-copy sends: the send is retried as a copy, nothing lost.
        q.push(TxSeg::Buf(pool.get(ZC_SEND_MIN_BYTES), ZC_SEND_MIN_BYTES));
        q.prepare(types::Fd(-1), 3).expect("a send");
        q.on_sent(-libc::EOPNOTSUPP, false, &mut pool).unwrap();
        let e = q.prepare(types::Fd(-1), 3).expect("the retry");
        assert_eq!(e.get_user_data() >> 56, kind::SOCKET_SEND as u64);
    }
}
