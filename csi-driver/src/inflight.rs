//! One operation per volume at a time: a second call for a volume that is
//! busy fails at once with ABORTED, as the CSI spec asks, so the CO retries
//! later instead of two operations interleaving on one volume.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::CsiError;

#[derive(Clone, Default)]
pub struct InFlight {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while the operation runs; dropping it frees the volume.
pub struct InFlightGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    pub fn begin(&self, volume: &str, operation: &str) -> Result<InFlightGuard, CsiError> {
        let mut busy = self.busy.lock().expect("in-flight lock");
        if !busy.insert(volume.to_string()) {
            return Err(CsiError::Aborted(format!(
                "an operation on volume {volume:?} is already in progress; retry {operation} when it has finished"
            )));
        }
        Ok(InFlightGuard {
            busy: self.busy.clone(),
            key: volume.to_string(),
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.busy.lock().expect("in-flight lock").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_operation_on_a_busy_volume_is_aborted_until_the_first_ends() {
        let inflight = InFlight::default();
        let first = inflight.begin("v1", "CreateVolume").unwrap();
        let err = inflight.begin("v1", "DeleteVolume").err().unwrap();
        assert!(matches!(err, CsiError::Aborted(_)), "{err:?}");
        // Other volumes are not held up.
        let other = inflight.begin("v2", "CreateVolume").unwrap();
        drop(first);
        inflight.begin("v1", "DeleteVolume").unwrap();
        drop(other);
    }
}
