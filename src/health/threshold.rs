//! The rise/fall counter: a pure state machine, no I/O and no clock.
//!
//! A backend turns unhealthy after `fall` consecutive failures and healthy after `rise`
//! consecutive passes (HAProxy's semantics). A backend added while running starts
//! [`HealthState::Pending`] and takes traffic after its first passing check.

/// What active checks currently say about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Added while running, not checked yet: no traffic until the first pass.
    Pending,
    Healthy,
    Unhealthy,
}

/// A state change reported by [`HealthCounter::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

#[derive(Debug, Clone)]
pub struct HealthCounter {
    rise: u32,
    fall: u32,
    state: HealthState,
    /// Consecutive results that disagree with `state`.
    streak: u32,
}

impl HealthCounter {
    pub fn new(rise: u32, fall: u32, state: HealthState) -> Self {
        HealthCounter {
            rise: rise.max(1),
            fall: fall.max(1),
            state,
            streak: 0,
        }
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Changes thresholds (on reload) without forgetting the current state.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    /// Forces a state, e.g. when a reload turns active checks off.
    pub fn set_state(&mut self, state: HealthState) {
        self.state = state;
        self.streak = 0;
    }

    /// Records one probe result and reports whether the state flipped.
    pub fn record(&mut self, ok: bool) -> Option<Transition> {
        match (self.state, ok) {
            (HealthState::Pending, true) => {
                self.set_state(HealthState::Healthy);
                Some(Transition::Up)
            }
            (HealthState::Pending, false) => {
                self.streak += 1;
                if self.streak >= self.fall {
                    self.set_state(HealthState::Unhealthy);
                }
                None
            }
            (HealthState::Healthy, true) | (HealthState::Unhealthy, false) => {
                self.streak = 0;
                None
            }
            (HealthState::Healthy, false) => {
                self.streak += 1;
                (self.streak >= self.fall).then(|| {
                    self.set_state(HealthState::Unhealthy);
                    Transition::Down
                })
            }
            (HealthState::Unhealthy, true) => {
                self.streak += 1;
                (self.streak >= self.rise).then(|| {
                    self.set_state(HealthState::Healthy);
                    Transition::Up
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn becomes_unhealthy_after_fall_consecutive_failures() {
        let mut c = HealthCounter::new(2, 3, HealthState::Healthy);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), None, "a pass resets the failure streak");
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(Transition::Down));
        assert_eq!(c.state(), HealthState::Unhealthy);
    }

    #[test]
    fn becomes_healthy_after_rise_consecutive_passes() {
        let mut c = HealthCounter::new(2, 1, HealthState::Unhealthy);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Transition::Up));
        assert_eq!(c.state(), HealthState::Healthy);
    }

    #[test]
    fn pending_turns_healthy_on_first_pass() {
        let mut c = HealthCounter::new(5, 2, HealthState::Pending);
        assert_eq!(c.record(true), Some(Transition::Up));
        let mut c = HealthCounter::new(5, 2, HealthState::Pending);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.state(), HealthState::Unhealthy);
        assert_eq!(
            c.record(true),
            None,
            "after failing, rise passes are needed"
        );
    }
}
