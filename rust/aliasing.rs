//! Finds arguments that share memory, which would make the in-place update
//! read what it has just written (or write one buffer twice).

/// A buffer's address range and whether the update writes it.
#[derive(Clone, Debug)]
pub struct Region<L> {
    pub start: usize,
    pub len_bytes: usize,
    pub written: bool,
    pub label: L,
}

/// The first pair of regions that overlap where at least one is written
/// (two gradients may share memory: they are only read). Empty regions never
/// overlap anything.
pub fn find_overlap<L: Clone>(regions: &[Region<L>]) -> Option<(L, L)> {
    let mut sorted: Vec<&Region<L>> = regions.iter().filter(|r| r.len_bytes > 0).collect();
    sorted.sort_by_key(|r| r.start);
    // Sorted by start, a region overlaps an earlier one exactly when it starts
    // before that one's end, so the furthest-reaching earlier regions suffice.
    let mut furthest_any: Option<&Region<L>> = None;
    let mut furthest_written: Option<&Region<L>> = None;
    let end = |r: &Region<L>| r.start + r.len_bytes;
    for region in sorted {
        let rival = if region.written {
            furthest_any
        } else {
            furthest_written
        };
        if let Some(rival) = rival.filter(|rival| region.start < end(rival)) {
            return Some((rival.label.clone(), region.label.clone()));
        }
        if furthest_any.is_none_or(|f| end(region) > end(f)) {
            furthest_any = Some(region);
        }
        if region.written && furthest_written.is_none_or(|f| end(region) > end(f)) {
            furthest_written = Some(region);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(
        start: usize,
        len_bytes: usize,
        written: bool,
        label: &'static str,
    ) -> Region<&'static str> {
        Region {
            start,
            len_bytes,
            written,
            label,
        }
    }

    #[test]
    fn disjoint_and_read_only_overlaps_pass() {
        let regions = [
            region(0, 16, true, "p"),
            region(16, 16, true, "m"),
            region(100, 8, false, "g0"),
            region(104, 8, false, "g1"),
            region(16, 0, true, "empty"),
        ];
        assert_eq!(find_overlap(&regions), None);
    }

    #[test]
    fn a_written_overlap_is_found_behind_a_long_read_only_region() {
        let regions = [
            region(0, 100, false, "g"),
            region(10, 80, true, "m"),
            region(200, 4, true, "p"),
        ];
        assert_eq!(find_overlap(&regions), Some(("g", "m")));
        let nested = [
            region(0, 100, true, "p"),
            region(1, 200, false, "g0"),
            region(50, 4, false, "g1"),
        ];
        assert_eq!(find_overlap(&nested), Some(("p", "g0")));
        let hidden = [
            region(0, 10, false, "g0"),
            region(2, 100, false, "g1"),
            region(5, 1, true, "v"),
        ];
        assert_eq!(find_overlap(&hidden), Some(("g1", "v")));
    }
}
