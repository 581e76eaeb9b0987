//! Host flushes (invariant 6): write-back data is durable when it is acknowledged (frames are
//! written with FUA on a volatile-cache device), so a flush waits only for write-through data
//! still in the SAN's cache — a SAN flush covering every write-through write acknowledged
//! before the host's flush arrived.

use super::volume::{FlushOp, PendingOp, SanOp};
use super::{Engine, Status};
use crate::link::SanRequest;
use crate::types::OpId;

impl Engine {
    pub(super) fn start_flush(&mut self, vi: usize, token: u64, now: u64) {
        let op = OpId(self.next_id());
        let v = &mut self.volumes[vi];
        let f = FlushOp { token, need: v.wt_acks, deadline_ns: now + self.cfg.san_timeout_ns };
        v.ops.insert(op, PendingOp::Flush(f));
        v.flushes.push(op);
        self.poll_flushes(vi, now);
    }

    pub(super) fn poll_flushes(&mut self, vi: usize, now: u64) -> usize {
        if self.volumes[vi].flushes.is_empty() {
            return 0;
        }
        let mut work = 0;
        let skip_san = self.cfg.bugs.host_flush_skips_san;
        let v = &mut self.volumes[vi];
        let mut finished = Vec::new();
        let mut need_max = 0u64;
        let (ops, upto) = (&v.ops, v.san_flushed_upto);
        v.flushes.retain(|&op| {
            let Some(PendingOp::Flush(f)) = ops.get(&op) else { unreachable!() };
            if f.need <= upto || skip_san {
                finished.push((op, Status::Ok));
                false
            } else if now >= f.deadline_ns {
                finished.push((op, Status::Busy));
                false
            } else {
                need_max = need_max.max(f.need);
                true
            }
        });
        for (op, status) in finished {
            let Some(PendingOp::Flush(f)) = self.volumes[vi].ops.remove(&op) else { unreachable!() };
            self.complete(vi, f.token, status, None, None);
            work += 1;
        }
        let v = &self.volumes[vi];
        if need_max > 0 && !v.host_san_flush_in_flight && v.san_health.may_try(now) {
            let covers = v.wt_acks;
            self.volumes[vi].host_san_flush_in_flight = true;
            self.san_request(vi, SanOp::Flush { covers }, SanRequest::Flush);
            work += 1;
        }
        work
    }
}
