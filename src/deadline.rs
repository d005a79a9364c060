//! When a piece of work stops being worth doing.

use std::time::{Duration, Instant};

/// The instant by which a job must be done, or never. Work whose deadline
/// has passed is dropped before it starts, and waits are cut at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// No deadline: the command line's, which waits as long as it takes.
    pub const NEVER: Deadline = Deadline(None);

    pub fn at(instant: Instant) -> Deadline {
        Deadline(Some(instant))
    }

    /// `duration` from now; one too long to represent is never.
    pub fn after(duration: Duration) -> Deadline {
        Deadline(Instant::now().checked_add(duration))
    }

    pub fn instant(&self) -> Option<Instant> {
        self.0
    }

    pub fn expired(&self) -> bool {
        self.0.is_some_and(|at| at <= Instant::now())
    }

    /// Time left, none for no deadline; zero once it has passed.
    pub fn remaining(&self) -> Option<Duration> {
        self.0.map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// The earlier of the two.
    pub fn min(self, other: Deadline) -> Deadline {
        match (self.0, other.0) {
            (Some(a), Some(b)) => Deadline(Some(a.min(b))),
            (a, b) => Deadline(a.or(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earlier_deadline_wins_and_never_never_expires() {
        let soon = Deadline::after(Duration::from_millis(10));
        let later = Deadline::after(Duration::from_secs(60));
        assert_eq!(soon.min(later), soon);
        assert_eq!(Deadline::NEVER.min(later), later);
        assert_eq!(later.min(Deadline::NEVER), later);
        assert!(!Deadline::NEVER.expired());
        assert_eq!(Deadline::NEVER.remaining(), None);
        assert!(Deadline::at(Instant::now()).expired());
        assert_eq!(Deadline::at(Instant::now()).remaining(), Some(Duration::ZERO));
        assert!(!later.expired());
        assert_eq!(Deadline::after(Duration::MAX), Deadline::NEVER);
    }
}
