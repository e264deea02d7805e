//! Per-group quorum: how many slots of each group a set of approvers fills, where each
//! person fills at most one slot and any assignment of people to slots counts (a maximum
//! bipartite matching) — pure.

use std::collections::BTreeMap;

/// One group's progress: slots filled out of slots required.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupProgress {
    pub group: String,
    pub filled: u32,
    pub required: u32,
}

/// The best filling of `required` (group -> distinct people needed) by `approvers`, each
/// given as the quorum groups that person belongs to. Returns every group of `required`
/// in its order, with how many slots the largest assignment fills.
pub fn fill_quorum(
    required: &BTreeMap<String, u32>,
    approvers: &[&[String]],
) -> Vec<GroupProgress> {
    // One slot per place to fill; a person may take any slot of a group they belong to.
    let slots: Vec<&str> = required
        .iter()
        .flat_map(|(group, count)| std::iter::repeat_n(group.as_str(), *count as usize))
        .collect();
    let mut slot_holder: Vec<Option<usize>> = vec![None; slots.len()];
    for person in 0..approvers.len() {
        let mut visited = vec![false; slots.len()];
        assign(person, approvers, &slots, &mut slot_holder, &mut visited);
    }
    required
        .iter()
        .map(|(group, count)| GroupProgress {
            group: group.clone(),
            filled: slots
                .iter()
                .zip(&slot_holder)
                .filter(|(slot, holder)| **slot == group.as_str() && holder.is_some())
                .count() as u32,
            required: *count,
        })
        .collect()
}

/// Is every slot of `required` filled?
pub fn quorum_met(required: &BTreeMap<String, u32>, approvers: &[&[String]]) -> bool {
    fill_quorum(required, approvers)
        .iter()
        .all(|group| group.filled >= group.required)
}

/// Kuhn's augmenting path: gives `person` a slot, moving earlier holders to other slots
/// of their groups where that frees one.
fn assign(
    person: usize,
    approvers: &[&[String]],
    slots: &[&str],
    slot_holder: &mut [Option<usize>],
    visited: &mut [bool],
) -> bool {
    for slot in 0..slots.len() {
        if visited[slot] || !approvers[person].iter().any(|group| group == slots[slot]) {
            continue;
        }
        visited[slot] = true;
        let free = match slot_holder[slot] {
            None => true,
            Some(holder) => assign(holder, approvers, slots, slot_holder, visited),
        };
        if free {
            slot_holder[slot] = Some(person);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
        entries
            .iter()
            .map(|(group, count)| (group.to_string(), *count))
            .collect()
    }

    fn groups(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    /// (case, required, each approver's groups, filled per group, quorum met)
    type Case = (
        &'static str,
        BTreeMap<String, u32>,
        Vec<Vec<String>>,
        Vec<u32>,
        bool,
    );

    #[test]
    fn any_assignment_of_people_to_slots_counts() {
        let finance_ops = map(&[("finance", 1), ("ops", 1)]);
        let table: Vec<Case> = vec![
            ("nobody yet", finance_ops.clone(), vec![], vec![0, 0], false),
            (
                "one person in both groups fills one slot only",
                finance_ops.clone(),
                vec![groups(&["finance", "ops"])],
                vec![1, 0],
                false,
            ),
            (
                "both-groups person then a finance person: the first moves to ops",
                finance_ops.clone(),
                vec![groups(&["finance", "ops"]), groups(&["finance"])],
                vec![1, 1],
                true,
            ),
            (
                "both-groups person then an ops person",
                finance_ops.clone(),
                vec![groups(&["finance", "ops"]), groups(&["ops"])],
                vec![1, 1],
                true,
            ),
            (
                "two finance people leave ops empty",
                finance_ops.clone(),
                vec![groups(&["finance"]), groups(&["finance"])],
                vec![1, 0],
                false,
            ),
            (
                "an approver in no quorum group fills nothing",
                finance_ops.clone(),
                vec![groups(&[]), groups(&["ops"])],
                vec![0, 1],
                false,
            ),
            (
                "two of one group, one of another, chained reassignment",
                map(&[("a", 2), ("b", 1)]),
                vec![groups(&["a", "b"]), groups(&["a", "b"]), groups(&["a"])],
                vec![2, 1],
                true,
            ),
            (
                "three people for three slots but one cannot fit",
                map(&[("a", 1), ("b", 2)]),
                vec![groups(&["a"]), groups(&["a"]), groups(&["b"])],
                vec![1, 1],
                false,
            ),
        ];
        for (case, required, approvers, filled, met) in table {
            let approvers: Vec<&[String]> = approvers.iter().map(Vec::as_slice).collect();
            let progress = fill_quorum(&required, &approvers);
            assert_eq!(
                progress
                    .iter()
                    .map(|group| group.filled)
                    .collect::<Vec<_>>(),
                filled,
                "{case}"
            );
            assert_eq!(quorum_met(&required, &approvers), met, "{case}");
        }
    }
}
