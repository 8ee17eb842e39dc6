//! The model's router (`moe::gate::route`, from logits, f64) and the pure selection function
//! (`moe::node_routing::group_limited_topk`, from f32 affinities, OFF's f32 adds) implement the
//! same eq. (16) group-limited routing with different arithmetic. On random tokens they must pick
//! the same experts, except where the selection is a near-tie (two candidates, or two groups,
//! closer than the two implementations' rounding can separate).

use dsv3_reference::moe::gate::{route, GateConfig, ScoringFunc, TopkMethod};
use dsv3_reference::moe::node_routing::{group_limited_topk, RoutingConfig};
use dsv3_reference::rng::Rng;
use ndarray::{Array1, Array2};

#[test]
fn gate_route_and_group_limited_topk_select_the_same_experts() {
    // (E, n_group, topk_group, top_k): V3's shape and smaller ones
    let shapes = [
        (256usize, 8usize, 4usize, 8usize),
        (64, 8, 4, 8),
        (32, 4, 2, 4),
        (16, 2, 1, 3),
    ];
    let mut rng = Rng::new(11);
    let (mut compared, mut near_ties) = (0usize, 0usize);
    for &(e, n_group, topk_group, top_k) in &shapes {
        let gate = GateConfig {
            top_k,
            n_group,
            topk_group,
            scoring_func: ScoringFunc::Sigmoid,
            topk_method: TopkMethod::NoauxTc,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        };
        let sel = RoutingConfig {
            top_k,
            n_group,
            topk_group,
            group_score_topk: 2,
        };
        let t = 200;
        let logits = Array2::from_shape_fn((t, e), |_| (rng.normal() * 2.0) as f32);
        let bias = Array1::from_shape_fn(e, |_| (rng.normal() * 0.05) as f32);
        let routing = route(logits.view(), Some(bias.as_slice().unwrap()), &gate).unwrap();
        // f32 affinities, as OFF computes them before adding the f32 bias
        let s = logits.mapv(|u| (1.0 / (1.0 + (-f64::from(u)).exp())) as f32);
        let ids = group_limited_topk(s.view(), Some(bias.view()), &sel).unwrap();
        for tok in 0..t {
            let mut a: Vec<usize> = routing.ids.row(tok).to_vec();
            let mut b: Vec<usize> = ids.row(tok).to_vec();
            a.sort_unstable();
            b.sort_unstable();
            compared += 1;
            if a == b {
                continue;
            }
            // a difference is acceptable only at a near-tie of the selection scores: every
            // expert picked by one side and not the other has a selection score within a few
            // f32 ulps (the f32 affinity rounding and the f32 add) of one picked only by the other
            let score = |i: usize| f64::from(s[[tok, i]]) + f64::from(bias[i]);
            let only_a: Vec<usize> = a.iter().copied().filter(|i| !b.contains(i)).collect();
            let only_b: Vec<usize> = b.iter().copied().filter(|i| !a.contains(i)).collect();
            let tol = 4.0 * f64::from(f32::EPSILON);
            let close = only_a.iter().all(|&i| {
                only_b
                    .iter()
                    .any(|&j| (score(i) - score(j)).abs() <= tol * score(i).abs().max(1.0))
            });
            assert!(
                close || only_a.is_empty(),
                "token {tok} (E={e}): {a:?} vs {b:?} is not a near-tie"
            );
            near_ties += 1;
        }
    }
    assert!(compared == 800);
    assert!(
        near_ties * 100 < compared,
        "{near_ties} near-ties out of {compared}: not a rounding effect"
    );
}
