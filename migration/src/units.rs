//! Sizes for people (`1.00 GiB`, `1.00 GiB (1073741824 bytes)`): kept in
//! [`ferry_proto::units`], where the destination's refusals are written
//! too; re-exported so the paths stay.

pub use ferry_proto::units::*;
