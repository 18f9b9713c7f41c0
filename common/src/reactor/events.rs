//! Readiness as the handlers see it: per source, gathered since the handler last ran.

/// Most sockets/pipes one connection may register (the proxy uses front and back, and while a
/// routing proxy asks a tracker, the lookup socket as a third).
pub const MAX_SOURCES: usize = 4;

/// Readiness bits of one source.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ready(u8);

impl Ready {
    pub const READABLE: Ready = Ready(1);
    pub const WRITABLE: Ready = Ready(2);
    /// The peer closed its write side (or the whole connection).
    pub const HUP: Ready = Ready(4);
    pub const ERROR: Ready = Ready(8);

    pub fn from_event(e: &mio::event::Event) -> Ready {
        let mut r = Ready(0);
        if e.is_readable() {
            r.0 |= Self::READABLE.0;
        }
        if e.is_writable() {
            r.0 |= Self::WRITABLE.0;
        }
        if e.is_read_closed() || e.is_write_closed() {
            r.0 |= Self::HUP.0;
        }
        if e.is_error() {
            r.0 |= Self::ERROR.0;
        }
        r
    }
    pub fn contains(self, other: Ready) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn insert(&mut self, other: Ready) {
        self.0 |= other.0;
    }
}

/// Everything that happened to one connection since its handler last ran.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    pub(crate) ready: [Ready; MAX_SOURCES],
    /// The deadline the connection asked for has passed.
    pub timer: bool,
    /// The process is shutting down: finish what is in flight, start nothing new.
    pub draining: bool,
}

impl Events {
    pub fn ready(&self, source: usize) -> Ready {
        self.ready.get(source).copied().unwrap_or_default()
    }
    pub fn readable(&self, source: usize) -> bool {
        let r = self.ready(source);
        r.contains(Ready::READABLE) || r.contains(Ready::HUP) || r.contains(Ready::ERROR)
    }
    pub fn writable(&self, source: usize) -> bool {
        let r = self.ready(source);
        r.contains(Ready::WRITABLE) || r.contains(Ready::ERROR)
    }
    pub fn add(&mut self, source: usize, r: Ready) {
        if let Some(slot) = self.ready.get_mut(source) {
            slot.insert(r);
        }
    }
    pub fn merge(&mut self, other: &Events) {
        for (a, b) in self.ready.iter_mut().zip(other.ready) {
            a.insert(b);
        }
        self.timer |= other.timer;
        self.draining |= other.draining;
    }
    /// True when there is nothing for a handler to look at.
    pub fn is_empty(&self) -> bool {
        self.ready.iter().all(|r| r.is_empty()) && !self.timer
    }
}
