//! Physical Region Page entries: how a command tells a PCIe controller where its data is
//! (base specification, section 4.3). PRP1 points at the first byte (it may carry an offset into
//! its page); PRP2 is the second page when the transfer touches exactly two, otherwise the
//! address of a PRP list of the remaining pages. A list page holds 512 entries; when more pages
//! remain than fit, its last entry points at the next list page instead.
//!
//! Pure functions over IOVAs, so the rules are tested without a device and the fake
//! controller's independent walker checks the driver's lists.

/// The memory page size the driver configures (CC.MPS = 0).
pub const PAGE_BYTES: usize = 4096;
/// PRP entries in one list page.
pub const ENTRIES_PER_LIST: usize = PAGE_BYTES / 8;

/// How many memory pages `len` bytes starting `offset` bytes into a page touch.
#[cfg(test)]
pub fn pages_touched(offset: usize, len: usize) -> usize {
    (offset % PAGE_BYTES + len).div_ceil(PAGE_BYTES)
}

/// How many PRP list pages a transfer over `pages` memory pages needs.
pub fn list_pages(pages: usize) -> usize {
    if pages <= 2 {
        return 0;
    }
    // k list pages hold 511 * (k - 1) + 512 entries: all but the last lose one to the chain.
    let entries = pages - 1;
    (entries + ENTRIES_PER_LIST - 3) / (ENTRIES_PER_LIST - 1)
}

/// One PRP list page: its IOVA and its entries (the page's memory).
pub struct ListPage<'a> {
    pub iova: u64,
    pub entries: &'a mut [u64],
}

/// Fills the list pages for a transfer over memory pages `pages` (their IOVAs in order: the
/// first may carry an offset, every other one is page aligned) and returns (PRP1, PRP2).
/// `lists` must hold [`list_pages`]`(pages.len())` pages (fewer is our bug: asserted).
pub fn build(pages: &[u64], lists: &mut [ListPage<'_>]) -> (u64, u64) {
    debug_assert!(
        pages.iter().skip(1).all(|p| p % PAGE_BYTES as u64 == 0),
        "PRP entries after the first are page aligned"
    );
    match pages {
        [] => (0, 0),
        [one] => (*one, 0),
        [first, second] => (*first, *second),
        [first, rest @ ..] => {
            assert!(lists.len() >= list_pages(pages.len()), "PRP list pages missing");
            let mut left = rest;
            let mut li = 0;
            while !left.is_empty() {
                let next_iova = lists.get(li + 1).map(|l| l.iova);
                let list = &mut lists[li];
                assert!(list.entries.len() >= ENTRIES_PER_LIST, "a PRP list page holds 512 entries");
                if left.len() <= ENTRIES_PER_LIST {
                    for (e, p) in list.entries.iter_mut().zip(left) {
                        *e = p.to_le();
                    }
                    break;
                }
                let (now, later) = left.split_at(ENTRIES_PER_LIST - 1);
                for (e, p) in list.entries.iter_mut().zip(now) {
                    *e = p.to_le();
                }
                list.entries[ENTRIES_PER_LIST - 1] = next_iova.unwrap_or(0).to_le();
                left = later;
                li += 1;
            }
            (*first, lists[0].iova)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_list_pages() {
        assert_eq!(pages_touched(0, 4096), 1);
        assert_eq!(pages_touched(0x200, 4096), 2);
        assert_eq!(pages_touched(0x200, 8192), 3);
        assert_eq!(pages_touched(4095, 2), 2);
        assert_eq!([0, 1, 2, 3].map(list_pages), [0, 0, 0, 1]);
        // 513 pages: 512 entries fit one list; 514 need a chain.
        assert_eq!((list_pages(513), list_pages(514)), (1, 2));
        // 2 lists hold 511 + 512 entries; one more needs a third.
        assert_eq!((list_pages(1024), list_pages(1025)), (2, 3));
    }

    #[test]
    fn one_and_two_pages_need_no_list() {
        assert_eq!(build(&[0x1000_0200], &mut []), (0x1000_0200, 0));
        // A 4 KiB buffer starting 0x200 into a page crosses into the next page.
        assert_eq!(build(&[0x1000_0200, 0x7000_0000], &mut []), (0x1000_0200, 0x7000_0000));
    }

    #[test]
    fn a_page_crossing_buffer_uses_a_list() {
        // 8 KiB starting 0x200 into a page: three pages, PRP2 is a list of pages 2 and 3.
        let pages = [0xA000_0200, 0xB000_0000, 0xC000_0000];
        let mut mem = vec![0u64; ENTRIES_PER_LIST];
        let mut lists = [ListPage { iova: 0xF000_0000, entries: &mut mem }];
        assert_eq!(build(&pages, &mut lists), (0xA000_0200, 0xF000_0000));
        assert_eq!(&mem[..3], &[0xB000_0000, 0xC000_0000, 0]);
    }

    #[test]
    fn lists_chain_across_several_pages() {
        // 1100 pages: 1099 entries = 511 + 511 + 77 over three list pages.
        let pages: Vec<u64> = (0..1100u64).map(|i| 0x1_0000_0000 + i * 0x3000).collect();
        let mut mem = vec![vec![0u64; ENTRIES_PER_LIST]; 3];
        let iovas = [0xF000_0000u64, 0xE000_0000, 0xD000_0000];
        let mut lists: Vec<ListPage> =
            mem.iter_mut().zip(iovas).map(|(m, iova)| ListPage { iova, entries: m.as_mut_slice() }).collect();
        assert_eq!(list_pages(pages.len()), 3);
        let (prp1, prp2) = build(&pages, &mut lists);
        assert_eq!((prp1, prp2), (pages[0], iovas[0]));
        assert_eq!(&mem[0][..511], &pages[1..512]);
        assert_eq!(mem[0][511], iovas[1], "the last entry of a full list chains to the next");
        assert_eq!(&mem[1][..511], &pages[512..1023]);
        assert_eq!(mem[1][511], iovas[2]);
        assert_eq!(&mem[2][..77], &pages[1023..]);
        assert!(mem[2][77..].iter().all(|&e| e == 0));
    }
}
