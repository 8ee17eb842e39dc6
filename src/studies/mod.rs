//! The studies behind the training-side and precision commands, with their plots and tables:
//! - [`accum_study`]: `dsv3 accum-study`, V3 §3.3.2's accumulation experiment;
//! - [`balance_sim`]: `dsv3 balance-sim`, expert load with and without the bias update;
//! - [`eplb`]: `dsv3 eplb`, GPU/node imbalance before and after redundant-expert placement;
//! - [`schedule`]: `dsv3 schedule`, pipeline timelines and V3 Table 2;
//! - [`adamw_drift`]: `dsv3 adamw-drift`, BF16-moment AdamW against f64;
//! - [`model_stats`]: `dsv3 model-stats`, parameters, KV cache, FLOPs and training cost from a config;
//! - [`plot`]: the SVG line and bar charts they draw.

pub mod accum_study;
pub mod adamw_drift;
pub mod balance_sim;
pub mod eplb;
pub mod model_stats;
pub mod plot;
pub mod schedule;
