//! Topology: storage nodes and CSI nodes are placed in zones, named by one
//! segment key. A volume lives on a node of one zone and is reported as
//! accessible from that zone.

use std::collections::HashMap;

use strata_proto::csi::{Topology, TopologyRequirement};

use crate::error::CsiError;

pub const ZONE_KEY: &str = "topology.strata.io/zone";

pub fn zone_topology(zone: &str) -> Topology {
    Topology {
        segments: HashMap::from([(ZONE_KEY.to_string(), zone.to_string())]),
    }
}

/// The zone a topology segment names; INVALID_ARGUMENT when it names none,
/// because this driver only ever advertises the zone key.
pub fn zone_of(topology: &Topology) -> Result<String, CsiError> {
    match topology.segments.get(ZONE_KEY) {
        Some(zone) if !zone.is_empty() => Ok(zone.clone()),
        _ => Err(CsiError::invalid(format!(
            "topology {:?} has no {ZONE_KEY} segment; strata-csi only places volumes by zone",
            topology.segments
        ))),
    }
}

/// Where a new volume may go: zones to try in order, and whether other
/// zones may follow them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZoneChoice {
    pub order: Vec<String>,
    /// Only the zones in `order` (requisite was given).
    pub restricted: bool,
}

/// Preferred zones first (in the CO's order), then the rest of requisite;
/// with no requisite, any zone may follow the preferred ones.
pub fn zone_choice(requirement: Option<&TopologyRequirement>) -> Result<ZoneChoice, CsiError> {
    let Some(requirement) = requirement else {
        return Ok(ZoneChoice::default());
    };
    let requisite = requirement
        .requisite
        .iter()
        .map(zone_of)
        .collect::<Result<Vec<_>, _>>()?;
    let preferred = requirement
        .preferred
        .iter()
        .map(zone_of)
        .collect::<Result<Vec<_>, _>>()?;
    let mut order: Vec<String> = Vec::new();
    for zone in preferred.iter().chain(requisite.iter()) {
        let allowed = requisite.is_empty() || requisite.contains(zone);
        if allowed && !order.contains(zone) {
            order.push(zone.clone());
        }
    }
    Ok(ZoneChoice {
        order,
        restricted: !requisite.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_zones_come_first_and_requisite_restricts() {
        let requirement = TopologyRequirement {
            requisite: vec![zone_topology("a"), zone_topology("b"), zone_topology("c")],
            preferred: vec![zone_topology("c"), zone_topology("a")],
        };
        let choice = zone_choice(Some(&requirement)).unwrap();
        assert_eq!(choice.order, ["c", "a", "b"]);
        assert!(choice.restricted);

        let preferred_only = TopologyRequirement {
            requisite: vec![],
            preferred: vec![zone_topology("b")],
        };
        let choice = zone_choice(Some(&preferred_only)).unwrap();
        assert_eq!(choice.order, ["b"]);
        assert!(!choice.restricted);

        let foreign = TopologyRequirement {
            requisite: vec![Topology {
                segments: HashMap::from([("kubernetes.io/hostname".into(), "n1".into())]),
            }],
            preferred: vec![],
        };
        assert!(matches!(
            zone_choice(Some(&foreign)),
            Err(CsiError::InvalidArgument(_))
        ));
    }
}
