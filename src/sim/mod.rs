//! Simulations behind the study commands of the training-side equations:
//! - [`balance_sim`]: `dsv3 balance-sim`, expert load with and without the bias update;
//! - [`eplb`]: `dsv3 eplb`, GPU/node imbalance before and after redundant-expert placement;
//! - [`schedule`]: `dsv3 schedule`, pipeline timelines and V3 Table 2;
//! - [`adamw_drift`]: `dsv3 adamw-drift`, BF16-moment AdamW against f64.

pub mod adamw_drift;
pub mod balance_sim;
pub mod eplb;
pub mod schedule;
