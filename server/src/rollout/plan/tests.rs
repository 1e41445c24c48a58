//! The step function against hand-built groups.

use std::time::Duration;

use super::*;

fn policy(waves: &[Amount], bake_secs: u64) -> Policy {
    Policy {
        waves: waves.to_vec(),
        bake: Duration::from_secs(bake_secs),
        max_applying: 0,
        failure_threshold: Amount::Count(1),
        spread_label: None,
    }
}

struct Fleet {
    ids: Vec<String>,
    sites: Vec<String>,
    online: Vec<bool>,
    progress: Vec<Option<Progress>>,
    busy: Vec<bool>,
}

impl Fleet {
    fn new(n: usize) -> Self {
        Self {
            ids: (0..n).map(|i| format!("n{i:02}")).collect(),
            sites: vec![String::new(); n],
            online: vec![true; n],
            progress: vec![None; n],
            busy: vec![false; n],
        }
    }

    fn targets(&self) -> Vec<Target<'_>> {
        (0..self.ids.len())
            .map(|i| Target {
                id: &self.ids[i],
                online: self.online[i],
                progress: self.progress[i],
                busy_elsewhere: self.busy[i],
                spread: &self.sites[i],
            })
            .collect()
    }

    fn release(&mut self, ids: &[String]) {
        for id in ids {
            let i = self.ids.iter().position(|x| x == id).unwrap();
            assert!(self.progress[i].is_none(), "{id} released twice");
            self.progress[i] = Some(Progress::Applying);
        }
    }

    fn commit_all(&mut self) {
        for p in self.progress.iter_mut().flatten() {
            *p = Progress::Committed;
        }
    }

    /// One step of a normal rollout of `p` over this fleet.
    fn step(&self, p: &Policy, group: GroupView, pos: &mut GroupProgress, now: i64) -> Step {
        step(p, Mode::default(), group, &self.targets(), pos, now)
    }

    fn in_service(&self) -> u32 {
        (0..self.ids.len())
            .filter(|&i| self.online[i] && self.progress[i] != Some(Progress::Applying))
            .count() as u32
    }
}

/// Desired 8, max unavailable 1: at least 7 in service, counted in `f`.
fn desired_8_of(f: &Fleet) -> GroupView {
    GroupView {
        desired: Some(8),
        max_unavailable: 1,
        in_service: f.in_service(),
        window_open: true,
    }
}

fn open(in_service: u32) -> GroupView {
    GroupView {
        desired: None,
        max_unavailable: 1,
        in_service,
        window_open: true,
    }
}

#[test]
fn canary_then_waves_after_each_finishes_and_bakes() {
    let p = policy(
        &[Amount::Count(1), Amount::Percent(25), Amount::Percent(100)],
        60,
    );
    let mut f = Fleet::new(20);
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(20), &mut pos, 0);
    assert_eq!(s.release, vec!["n00"]);
    f.release(&s.release);
    // The canary has not finished: nobody else starts.
    let s = f.step(&p, open(19), &mut pos, 1_000);
    assert!(s.release.is_empty());
    assert_eq!(s.waiting, Waiting::Wave);
    f.commit_all();
    // Finished at 2 s: baking for 60 s.
    let s = f.step(&p, open(20), &mut pos, 2_000);
    assert_eq!(s.waiting, Waiting::Bake(62_000));
    assert!(s.release.is_empty());
    let s = f.step(&p, open(20), &mut pos, 62_000);
    assert_eq!(s.release.len(), 4, "25% of 20 is 5, the canary among them");
    assert_eq!(pos.wave, 1);
    f.release(&s.release);
    f.commit_all();
    let s = f.step(&p, open(20), &mut pos, 70_000);
    assert_eq!(s.waiting, Waiting::Bake(130_000));
    let s = f.step(&p, open(20), &mut pos, 130_000);
    assert_eq!(s.release.len(), 15);
    f.release(&s.release);
    f.commit_all();
    let s = f.step(&p, open(20), &mut pos, 131_000);
    assert_eq!(s.waiting, Waiting::Done);
    assert_eq!(pos.wave_started_ms.len(), 3);
    assert_eq!(pos.wave_done_ms.get(&0), Some(&2_000));
}

#[test]
fn capacity_guard_never_goes_below_the_floor() {
    // 10 nodes, desired 8, max_unavailable 1: at least 7 in service.
    let p = policy(&[Amount::Percent(100)], 0);
    let mut f = Fleet::new(10);
    let mut pos = GroupProgress::default();
    let mut rounds = 0;
    loop {
        let s = f.step(&p, desired_8_of(&f), &mut pos, rounds);
        f.release(&s.release);
        assert!(f.in_service() >= 7, "guard broken: {}", f.in_service());
        if s.waiting == Waiting::Done {
            break;
        }
        if s.release.is_empty() {
            f.commit_all();
        }
        rounds += 1;
        assert!(rounds < 50);
    }
    assert_eq!(pos.lowest_in_service, Some(7));
}

#[test]
fn two_offline_leave_room_for_one_and_three_offline_for_none() {
    let p = policy(&[Amount::Percent(100)], 0);
    let mut f = Fleet::new(10);
    f.online[8] = false;
    f.online[9] = false;
    let mut pos = GroupProgress::default();
    let s = f.step(&p, desired_8_of(&f), &mut pos, 0);
    assert_eq!(s.release.len(), 1);
    f.release(&s.release);
    let s = f.step(&p, desired_8_of(&f), &mut pos, 1);
    assert!(s.release.is_empty());
    assert_eq!(s.waiting, Waiting::Capacity);
    f.commit_all();
    f.online[7] = false;
    let s = f.step(&p, desired_8_of(&f), &mut pos, 2);
    assert!(s.release.is_empty(), "7 in service is the floor");
    assert_eq!(s.waiting, Waiting::Capacity);
    // Force ignores the guard.
    let forced = Mode {
        emergency: true,
        force: true,
    };
    let s = step(&p, forced, desired_8_of(&f), &f.targets(), &mut pos, 3);
    assert_eq!(s.release.len(), 6);
}

#[test]
fn window_holds_normal_rollouts_but_not_emergencies() {
    let p = policy(&[Amount::Count(1), Amount::Percent(100)], 3600);
    let f = Fleet::new(5);
    let closed = GroupView {
        window_open: false,
        ..open(5)
    };
    let mut pos = GroupProgress::default();
    let s = f.step(&p, closed, &mut pos, 0);
    assert_eq!(s.waiting, Waiting::Window);
    assert!(s.release.is_empty());
    let emergency = Mode {
        emergency: true,
        force: false,
    };
    let s = step(&p, emergency, closed, &f.targets(), &mut pos, 0);
    assert_eq!(s.release.len(), 5, "every target in one step");
}

#[test]
fn a_canary_of_one_is_one_node_and_waves_spread_over_sites() {
    let mut p = policy(
        &[Amount::Count(1), Amount::Percent(50), Amount::Percent(100)],
        0,
    );
    p.spread_label = Some("site".into());
    let mut f = Fleet::new(12);
    for (i, s) in f.sites.iter_mut().enumerate() {
        *s = ["a", "b", "c"][i % 3].to_string();
    }
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(12), &mut pos, 0);
    assert_eq!(s.release.len(), 1, "a canary of 1 is one node");
    f.release(&s.release);
    f.commit_all();
    let s = f.step(&p, open(12), &mut pos, 1);
    assert_eq!(s.release.len(), 5, "50% of 12 is 6, one is out");
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    f.release(&s.release);
    for (i, pr) in f.progress.iter().enumerate() {
        if pr.is_some() {
            *per_site.entry(&f.sites[i]).or_default() += 1;
        }
    }
    assert_eq!(
        per_site.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    // One node per site, the case that used to take every node as a canary.
    let mut f = Fleet::new(3);
    for (i, s) in f.sites.iter_mut().enumerate() {
        *s = ["a", "b", "c"][i].to_string();
    }
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(3), &mut pos, 0);
    assert_eq!(s.release.len(), 1);
}

#[test]
fn waves_with_no_one_left_to_release_do_not_bake() {
    const BAKE: u64 = 1800;
    let bake_ms = BAKE as i64 * 1000;
    // One target: the canary is everyone; once it commits the rollout is
    // done at once, not after two more bakes.
    let p = policy(
        &[Amount::Count(1), Amount::Percent(10), Amount::Percent(100)],
        BAKE,
    );
    let mut f = Fleet::new(1);
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(1), &mut pos, 0);
    assert_eq!(s.release.len(), 1);
    f.release(&s.release);
    f.commit_all();
    let s = f.step(&p, open(1), &mut pos, 10);
    assert_eq!(s.waiting, Waiting::Done);
    assert_eq!(pos.wave, 2);
    assert!(pos.wave_done_ms.contains_key(&2));

    // Ten targets: 1, 10% (= 1: adds no node), 100%. The canary bakes once;
    // the empty second wave does not bake again.
    let mut f = Fleet::new(10);
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(10), &mut pos, 0);
    assert_eq!(s.release.len(), 1);
    f.release(&s.release);
    f.commit_all();
    let s = f.step(&p, open(10), &mut pos, 100);
    assert_eq!(s.waiting, Waiting::Bake(100 + bake_ms));
    let s = f.step(&p, open(10), &mut pos, 100 + bake_ms);
    assert_eq!(s.release.len(), 9, "no second bake for the empty wave");
    f.release(&s.release);
    f.commit_all();
    let s = f.step(&p, open(10), &mut pos, 200 + bake_ms);
    assert_eq!(s.waiting, Waiting::Done);
}

#[test]
fn max_applying_limits_each_group() {
    let mut p = policy(&[Amount::Percent(100)], 0);
    p.max_applying = 2;
    let mut f = Fleet::new(6);
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(6), &mut pos, 0);
    assert_eq!(s.release.len(), 2);
    f.release(&s.release);
    let s = f.step(&p, open(4), &mut pos, 1);
    assert!(s.release.is_empty());
    assert_eq!(s.waiting, Waiting::Capacity);
}

#[test]
fn a_node_that_arrives_later_is_released_in_the_last_wave() {
    let p = policy(&[Amount::Count(1), Amount::Percent(100)], 0);
    let mut f = Fleet::new(3);
    f.progress = vec![Some(Progress::Committed); 3];
    let mut pos = GroupProgress {
        wave: 1,
        ..Default::default()
    };
    let s = f.step(&p, open(3), &mut pos, 0);
    assert_eq!(s.waiting, Waiting::Done);
    f.ids.push("late".into());
    f.sites.push(String::new());
    f.online.push(true);
    f.progress.push(None);
    f.busy.push(false);
    let s = f.step(&p, open(4), &mut pos, 1);
    assert_eq!(s.release, vec!["late"]);
}

#[test]
fn offline_leftovers_settle_the_group() {
    let p = policy(&[Amount::Percent(100)], 0);
    let mut f = Fleet::new(3);
    f.online[2] = false;
    f.progress[0] = Some(Progress::Committed);
    f.progress[1] = Some(Progress::Failed);
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(2), &mut pos, 0);
    assert_eq!(s.waiting, Waiting::Offline);
    assert!(s.waiting.settled());
}

#[test]
fn a_large_wave_spreads_evenly_over_sites() {
    let mut p = policy(&[Amount::Percent(50), Amount::Percent(100)], 0);
    p.spread_label = Some("site".into());
    let mut f = Fleet::new(9_000);
    for (i, s) in f.sites.iter_mut().enumerate() {
        // Uneven sites: a has half the nodes.
        *s = if i % 2 == 0 {
            "a"
        } else if i % 4 == 1 {
            "b"
        } else {
            "c"
        }
        .to_string();
    }
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(9_000), &mut pos, 0);
    assert_eq!(s.release.len(), 4_500);
    f.release(&s.release);
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, pr) in f.progress.iter().enumerate() {
        if pr.is_some() {
            *per_site.entry(&f.sites[i]).or_default() += 1;
        }
    }
    // b and c have 2,250 nodes each: 1,500 from every site.
    assert_eq!(
        per_site.values().copied().collect::<Vec<_>>(),
        vec![1_500, 1_500, 1_500]
    );
}

#[test]
fn nodes_busy_with_another_patch_are_waited_for_not_given_up() {
    let p = policy(&[Amount::Percent(100)], 0);
    let mut f = Fleet::new(3);
    f.busy = vec![true; 3];
    let mut pos = GroupProgress::default();
    let s = f.step(&p, open(0), &mut pos, 0);
    assert!(s.release.is_empty());
    assert_eq!(s.waiting, Waiting::Busy);
    assert!(
        !s.waiting.settled(),
        "a rollout waiting on busy nodes is still running"
    );
    // One finishes its other patch: it starts now, the others still wait.
    f.busy[1] = false;
    let s = f.step(&p, open(1), &mut pos, 1);
    assert_eq!(s.release, vec!["n01"]);
    f.release(&s.release);
    f.commit_all();
    let s = f.step(&p, open(1), &mut pos, 2);
    assert_eq!(s.waiting, Waiting::Busy);
    f.busy = vec![false; 3];
    let s = f.step(&p, open(2), &mut pos, 3);
    assert_eq!(s.release, vec!["n00", "n02"]);
    // Busy and offline: it comes back busy; offline alone settles.
    let mut g = Fleet::new(2);
    g.busy[0] = true;
    g.online[1] = false;
    let s = g.step(&p, open(0), &mut GroupProgress::default(), 0);
    assert_eq!(s.waiting, Waiting::Busy);
    g.online[0] = false;
    let s = g.step(&p, open(0), &mut GroupProgress::default(), 0);
    assert_eq!(s.waiting, Waiting::Offline);
}

#[test]
fn superseded_nodes_count_as_finished_and_are_never_released() {
    let p = policy(&[Amount::Count(1), Amount::Percent(100)], 0);
    let mut f = Fleet::new(4);
    f.progress[0] = Some(Progress::Superseded);
    f.progress[3] = Some(Progress::Superseded);
    let mut pos = GroupProgress::default();
    // The canary wave is already full of superseded nodes: straight to wave 2.
    let s = f.step(&p, open(4), &mut pos, 0);
    assert_eq!(pos.wave, 1);
    assert_eq!(s.release, vec!["n01", "n02"]);
    f.release(&s.release);
    f.commit_all();
    let s = f.step(&p, open(4), &mut pos, 1);
    assert_eq!(s.waiting, Waiting::Done);
    assert!(s.release.is_empty());
}

mod properties {
    //! The planner's promises over random fleets and policies, stepped until
    //! done: never a node twice, never below the capacity floor, never an
    //! offline or busy node, never more than the per-group limit applying, and
    //! every online idle target released in the end.

    use proptest::prelude::*;

    use super::*;

    fn amount() -> impl Strategy<Value = Amount> {
        prop_oneof![
            (1u32..6).prop_map(Amount::Count),
            (1u32..=100).prop_map(Amount::Percent)
        ]
    }

    #[derive(Debug, Clone)]
    struct Case {
        online: Vec<bool>,
        busy: Vec<bool>,
        sites: Vec<u8>,
        waves: Vec<Amount>,
        max_applying: u32,
        desired: Option<u32>,
        max_unavailable: u32,
        spread: bool,
        /// Which applying nodes finish after each step (by position).
        finish: Vec<Vec<bool>>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (1usize..30).prop_flat_map(|n| {
            (
                proptest::collection::vec(prop::bool::weighted(0.85), n),
                proptest::collection::vec(prop::bool::weighted(0.1), n),
                proptest::collection::vec(0u8..4, n),
                proptest::collection::vec(amount(), 0..3),
                0u32..4,
                proptest::option::of(0u32..35),
                0u32..4,
                any::<bool>(),
                proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), 40),
            )
                .prop_map(
                    |(
                        online,
                        busy,
                        sites,
                        mut waves,
                        max_applying,
                        desired,
                        max_unavailable,
                        spread,
                        finish,
                    )| {
                        waves.push(Amount::Percent(100));
                        Case {
                            online,
                            busy,
                            sites,
                            waves,
                            max_applying,
                            desired,
                            max_unavailable,
                            spread,
                            finish,
                        }
                    },
                )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn steps_keep_every_promise(c in case()) {
            let n = c.online.len();
            let mut f = Fleet::new(n);
            f.online = c.online.clone();
            f.busy = c.busy.clone();
            f.sites = c.sites.iter().map(|s| format!("site-{s}")).collect();
            let mut p = policy(&c.waves, 0);
            p.max_applying = c.max_applying;
            p.spread_label = c.spread.then(|| "site".to_string());
            let mut pos = GroupProgress::default();
            let mut done = false;
            for (round, finishing) in c.finish.iter().enumerate() {
                let view = GroupView {
                    desired: c.desired,
                    max_unavailable: c.max_unavailable,
                    in_service: (0..n)
                        .filter(|&i| f.online[i] && !f.busy[i] && f.progress[i] != Some(Progress::Applying))
                        .count() as u32,
                    window_open: true,
                };
                let s = f.step(&p, view, &mut pos, round as i64);
                let mut seen = std::collections::HashSet::new();
                for id in &s.release {
                    let i = f.ids.iter().position(|x| x == id).unwrap();
                    prop_assert!(seen.insert(id.clone()), "{id} twice in one step");
                    prop_assert!(f.progress[i].is_none(), "{id} released again");
                    prop_assert!(f.online[i] && !f.busy[i], "{id} offline or busy");
                }
                let floor = view.min_in_service();
                if view.in_service >= floor {
                    prop_assert!(
                        view.in_service - s.release.len() as u32 >= floor,
                        "below the floor: {} in service, floor {floor}, released {}",
                        view.in_service, s.release.len()
                    );
                } else {
                    prop_assert!(s.release.is_empty(), "released while below the floor");
                }
                f.release(&s.release);
                let applying = f.progress.iter().filter(|p| **p == Some(Progress::Applying)).count();
                if c.max_applying > 0 {
                    prop_assert!(applying <= c.max_applying as usize, "{applying} applying");
                }
                if s.waiting == Waiting::Done {
                    done = true;
                    break;
                }
                for (i, fin) in finishing.iter().enumerate() {
                    if *fin && f.progress[i] == Some(Progress::Applying) {
                        f.progress[i] = Some(Progress::Committed);
                    }
                }
            }
            if done {
                for i in 0..n {
                    if f.online[i] && !f.busy[i] {
                        prop_assert!(f.progress[i].is_some(), "{} never released", f.ids[i]);
                    }
                }
            } else {
                // Liveness: once nothing is applying, a step releases a node
                // if one can go without taking the group below its floor.
                for p in f.progress.iter_mut() {
                    if *p == Some(Progress::Applying) {
                        *p = Some(Progress::Committed);
                    }
                }
                let in_service = (0..n).filter(|&i| f.online[i] && !f.busy[i]).count() as u32;
                let view = GroupView {
                    desired: c.desired,
                    max_unavailable: c.max_unavailable,
                    in_service,
                    window_open: true,
                };
                let releasable = (0..n)
                    .filter(|&i| f.online[i] && !f.busy[i] && f.progress[i].is_none())
                    .count();
                let s = f.step(&p, view, &mut pos, 1_000);
                if releasable > 0 && in_service > view.min_in_service() {
                    prop_assert!(!s.release.is_empty(), "stuck: {:?}", s.waiting);
                }
            }
        }
    }
}
