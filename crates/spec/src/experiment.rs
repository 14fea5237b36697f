//! tmp
/// x
pub struct ExperimentFile;
/// x
pub struct ExperimentSpec;
