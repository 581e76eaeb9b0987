//! Both halves of a flash device on one thread: an [`Engine`] and its [`Destager`], their
//! messages passed through a plain queue in order. What `stagerctl flash destage` and the
//! scenario tests use; stagerd runs the halves on two cores instead, linked by channels.

use crate::destage::{DestageEvent, Destager};
use crate::engine::{Engine, EngineEvent, HostDone};
use crate::link::{FromDestage, ToDestage};

pub struct Node {
    pub engine: Engine,
    pub destager: Destager,
    to_destage: Vec<ToDestage>,
    from_destage: Vec<FromDestage>,
}

impl Node {
    pub fn new(engine: Engine, destager: Destager) -> Node {
        Node { engine, destager, to_destage: Vec::new(), from_destage: Vec::new() }
    }

    /// Polls both halves once and passes their messages; returns the work done.
    pub fn poll(&mut self, now: u64) -> usize {
        let mut work = self.engine.poll(now);
        self.engine.drain_outbox(&mut self.to_destage);
        work += self.to_destage.len();
        for m in self.to_destage.drain(..) {
            self.destager.on_message(m, now);
        }
        work += self.destager.poll(now);
        self.destager.drain_outbox(&mut self.from_destage);
        work += self.from_destage.len();
        for m in self.from_destage.drain(..) {
            self.engine.on_message(m, now);
        }
        work
    }

    pub fn drain_completions(&mut self, out: &mut Vec<HostDone>) {
        self.engine.drain_completions(out);
    }

    pub fn drain_events(&mut self, engine: &mut Vec<EngineEvent>, destage: &mut Vec<DestageEvent>) {
        self.engine.drain_events(engine);
        self.destager.drain_events(destage);
    }

    /// Nothing dirty, nothing in flight on either half.
    pub fn is_quiescent(&self) -> bool {
        self.engine.is_quiescent() && self.destager.is_idle()
    }
}
