//! Guest memory layout as offered on the wire, and checks of page runs
//! against it.

use serde::{Deserialize, Serialize};

use crate::error::{Result, WireError};

/// The only page size Ferry moves today.
pub const PAGE_SIZE: u64 = 4096;
/// Largest number of memory regions an offer may carry.
pub const MAX_REGIONS: usize = 256;

/// One guest memory region: guest physical address and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    /// First guest physical address.
    pub gpa: u64,
    /// Size in bytes, a multiple of the page size.
    pub size: u64,
}

/// The guest memory layout: regions sorted by address, non-overlapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Page size in bytes.
    pub page_size: u64,
    /// Regions sorted by `gpa`.
    pub regions: Vec<RegionDesc>,
}

/// A run of contiguous pages inside one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// The pages are all zero: only the run travels, no data.
    pub zero: bool,
}

impl PageRun {
    /// Bytes of page data this run covers.
    pub fn bytes(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE
    }
    /// Bytes of payload this run puts on the wire (0 for a zero run).
    pub fn payload_bytes(&self) -> u64 {
        if self.zero {
            0
        } else {
            self.bytes()
        }
    }
}

impl MemoryLayout {
    /// An empty ledger (every page zero) for this layout: the evidence
    /// one side of a migration keeps (see [`crate::evidence`]).
    pub fn ledger(&self, key: crate::PageKey) -> Result<crate::Ledger> {
        let regions: Vec<(u64, u64)> = self.regions.iter().map(|r| (r.gpa, r.size)).collect();
        crate::Ledger::new(key, &regions).map_err(|e| WireError::Invalid {
            field: "memory layout",
            detail: e.to_string(),
        })
    }

    /// The layout of regions given as `(gpa, size)` in any order: sorted by
    /// address, with Ferry's page size.
    pub fn from_regions(regions: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut regions: Vec<RegionDesc> = regions
            .into_iter()
            .map(|(gpa, size)| RegionDesc { gpa, size })
            .collect();
        regions.sort_by_key(|r| r.gpa);
        MemoryLayout {
            page_size: PAGE_SIZE,
            regions,
        }
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total pages of guest memory.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / self.page_size
    }

    /// Checks that the layout is well formed: known page size, regions page
    /// aligned, non-empty, sorted, non-overlapping, and not too many.
    pub fn validate(&self) -> Result<()> {
        if self.page_size != PAGE_SIZE {
            return Err(WireError::Invalid {
                field: "page size",
                detail: format!("{} (only {PAGE_SIZE} is supported)", self.page_size),
            });
        }
        if self.regions.is_empty() {
            return Err(WireError::Invalid {
                field: "memory layout",
                detail: "no regions".into(),
            });
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(WireError::TooLarge {
                field: "region count",
                len: self.regions.len() as u64,
                limit: MAX_REGIONS as u64,
            });
        }
        let mut end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 || r.gpa % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 {
                return Err(WireError::Invalid {
                    field: "memory region",
                    detail: format!(
                        "region {i} at {:#x} size {:#x} is empty or not page aligned",
                        r.gpa, r.size
                    ),
                });
            }
            let r_end = r
                .gpa
                .checked_add(r.size)
                .ok_or_else(|| WireError::Invalid {
                    field: "memory region",
                    detail: format!("region {i} at {:#x} wraps the address space", r.gpa),
                })?;
            if i > 0 && r.gpa < end {
                return Err(WireError::Invalid {
                    field: "memory region",
                    detail: format!("region {i} at {:#x} overlaps or is out of order", r.gpa),
                });
            }
            end = r_end;
        }
        Ok(())
    }

    /// Checks that `pages` pages from `gpa` lie inside one region.
    pub fn check_run(&self, gpa: u64, pages: u64) -> Result<()> {
        let outside = || WireError::OutsideLayout { gpa, pages };
        if pages == 0 || !gpa.is_multiple_of(self.page_size) {
            return Err(outside());
        }
        let len = pages.checked_mul(self.page_size).ok_or_else(outside)?;
        let end = gpa.checked_add(len).ok_or_else(outside)?;
        let idx = self.regions.partition_point(|r| r.gpa <= gpa);
        if idx == 0 {
            return Err(outside());
        }
        let r = &self.regions[idx - 1];
        if end <= r.gpa + r.size {
            Ok(())
        } else {
            Err(outside())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> MemoryLayout {
        MemoryLayout {
            page_size: PAGE_SIZE,
            regions: vec![
                RegionDesc {
                    gpa: 0,
                    size: 16 * PAGE_SIZE,
                },
                RegionDesc {
                    gpa: 1 << 32,
                    size: 8 * PAGE_SIZE,
                },
            ],
        }
    }

    #[test]
    fn runs_inside_one_region_pass_and_others_fail() {
        let l = layout();
        l.validate().unwrap();
        l.check_run(0, 16).unwrap();
        l.check_run(15 * PAGE_SIZE, 1).unwrap();
        l.check_run(1 << 32, 8).unwrap();
        assert!(
            l.check_run(15 * PAGE_SIZE, 2).is_err(),
            "crosses region end"
        );
        assert!(
            l.check_run(16 * PAGE_SIZE, 1).is_err(),
            "hole between regions"
        );
        assert!(l.check_run((1 << 32) + 4 * PAGE_SIZE, 5).is_err());
        assert!(l.check_run(1, 1).is_err(), "unaligned");
        assert!(l.check_run(0, 0).is_err(), "empty");
        assert!(l.check_run(u64::MAX - 4095, 1).is_err(), "wraps");
        assert!(l.check_run(0, u64::MAX).is_err(), "overflow");
    }

    #[test]
    fn malformed_layouts_are_rejected() {
        let mut l = layout();
        l.regions.swap(0, 1);
        assert!(l.validate().is_err());
        let mut l = layout();
        l.regions[1].gpa = 8 * PAGE_SIZE;
        assert!(l.validate().is_err(), "overlap");
        let mut l = layout();
        l.page_size = 65536;
        assert!(l.validate().is_err());
        let mut l = layout();
        l.regions[0].size = 100;
        assert!(l.validate().is_err());
        assert_eq!(layout().total_bytes(), 24 * PAGE_SIZE);
    }
}
