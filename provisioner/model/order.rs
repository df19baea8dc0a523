//! The start-order graph: machines in waves by `depends_on`, and the cycle
//! that keeps a topology from starting.

use std::collections::{HashMap, HashSet};

use super::Machine;

/// Indices into `machines` by start wave (see [`Topology::start_waves`]).
pub(super) fn wave_indices(machines: &[Machine]) -> Vec<Vec<usize>> {
    let index = name_index(machines);
    let mut placed = vec![false; machines.len()];
    let mut waves: Vec<Vec<usize>> = Vec::new();
    loop {
        let ready = |(position, machine): &(usize, &Machine)| {
            !placed[*position]
                && machine.depends_on.iter().all(|dependency| {
                    index
                        .get(dependency.as_str())
                        .is_some_and(|&other| placed[other])
                })
        };
        let wave: Vec<usize> = machines
            .iter()
            .enumerate()
            .filter(ready)
            .map(|(position, _)| position)
            .collect();
        if wave.is_empty() {
            return waves;
        }
        for &position in &wave {
            placed[position] = true;
        }
        waves.push(wave);
    }
}

/// A dependency cycle, as machine names starting with the one earliest in
/// file order (each depends on the next, the last on the first); `None` when
/// every machine can start.
pub fn find_cycle(machines: &[Machine]) -> Option<Vec<&str>> {
    let placed: HashSet<usize> = wave_indices(machines).into_iter().flatten().collect();
    let index = name_index(machines);
    // Every unplaced machine waits on another unplaced machine; following
    // those waits from any of them must come back round.
    let waits_on = |position: usize| {
        machines
            .get(position)?
            .depends_on
            .iter()
            .filter_map(|dependency| index.get(dependency.as_str()).copied())
            .find(|other| !placed.contains(other))
    };
    let mut current = (0..machines.len()).find(|position| !placed.contains(position))?;
    let mut path = Vec::new();
    while !path.contains(&current) {
        path.push(current);
        current = waits_on(current)?;
    }
    let start = path.iter().position(|&position| position == current)?;
    let mut cycle = path.split_off(start);
    let earliest = (0..cycle.len()).min_by_key(|&at| cycle.get(at))?;
    cycle.rotate_left(earliest);
    cycle
        .into_iter()
        .map(|position| machines.get(position).map(|m| m.name.as_str()))
        .collect()
}

fn name_index(machines: &[Machine]) -> HashMap<&str, usize> {
    machines
        .iter()
        .enumerate()
        .map(|(position, machine)| (machine.name.as_str(), position))
        .collect()
}
