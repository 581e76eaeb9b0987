//! An endpoint's `wait_fd`: one epoll descriptor over everything that can give `poll()` work —
//! the TCP socket (readable, and writable while sends wait), the verbs completion channel, and
//! a periodic timer for heartbeats and the peer timeout — so a reactor sleeps on one fd per
//! endpoint and still wakes in time to notice a silent peer.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::FabricError;

pub(crate) struct Waker {
    epoll: OwnedFd,
    timer: OwnedFd,
    /// The socket whose write interest `want_write` switches.
    sock: RawFd,
    writing: bool,
}

fn cvt(what: &str, r: libc::c_int) -> Result<libc::c_int, FabricError> {
    if r < 0 {
        Err(FabricError::io(what, std::io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

impl Waker {
    /// Watches `sock` (read), `others` (read) and a timer firing every `tick`.
    pub fn new(sock: RawFd, others: &[RawFd], tick: Duration) -> Result<Waker, FabricError> {
        // SAFETY: plain syscalls; each returned fd is checked and owned right away.
        let epoll = unsafe { OwnedFd::from_raw_fd(cvt("epoll_create1", libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        // SAFETY: as above.
        let timer = unsafe {
            OwnedFd::from_raw_fd(cvt(
                "timerfd_create",
                libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC),
            )?)
        };
        let ts =
            libc::timespec { tv_sec: tick.as_secs() as libc::time_t, tv_nsec: tick.subsec_nanos() as libc::c_long };
        let spec = libc::itimerspec { it_interval: ts, it_value: ts };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        cvt("timerfd_settime", unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })?;
        let w = Waker { epoll, timer, sock, writing: false };
        w.ctl(libc::EPOLL_CTL_ADD, sock, (libc::EPOLLIN | libc::EPOLLRDHUP) as u32)?;
        w.ctl(libc::EPOLL_CTL_ADD, w.timer.as_raw_fd(), libc::EPOLLIN as u32)?;
        for &fd in others {
            w.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32)?;
        }
        Ok(w)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32) -> Result<(), FabricError> {
        let mut ev = libc::epoll_event { events, u64: fd as u64 };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt("epoll_ctl", unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Wakes on socket writability while `on` (sends are waiting in the send buffer).
    pub fn want_write(&mut self, on: bool) {
        if on != self.writing {
            let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            if on {
                events |= libc::EPOLLOUT as u32;
            }
            // A failure leaves the old interest; the timer still wakes the reactor.
            if self.ctl(libc::EPOLL_CTL_MOD, self.sock, events).is_ok() {
                self.writing = on;
            }
        }
    }

    /// Clears the timer's readability (its expirations are not counted: `poll()` looks at the
    /// clock itself).
    pub fn drain_timer(&self) {
        let mut n = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `n`; the timer fd is nonblocking.
        unsafe { libc::read(self.timer.as_raw_fd(), n.as_mut_ptr().cast(), n.len()) };
    }
}
