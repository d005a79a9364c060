//! A progressive JPEG's scans decoded to its DCT coefficients, which
//! [`super::pixels`] hands to libjpeg-turbo for the rest of the decode.
//!
//! libjpeg-turbo spends about a third of a progressive photo's CPU in its
//! refinement scans (jdphuff.c, `decode_mcu_AC_refine`): for each block it
//! walks every coefficient of the band, with a branch on each that the CPU
//! cannot predict, and reads the correction bits one at a time. Here each
//! block keeps a mask of its nonzero coefficients (in zigzag order), so a
//! refinement finds the zero a run ends on, and the coefficients that take a
//! correction bit, with a few bit operations, and reads those bits at once.
//! The scan data is unstuffed first, so the bit reader refills eight bytes
//! at a time.
//!
//! On a valid file the coefficients are libjpeg's, to the bit: each step
//! mirrors jdphuff.c. Whatever libjpeg would warn about or refuse (a bad
//! Huffman code, data cut short or left over, a progression out of order,
//! coefficients it would go on to smooth) makes this decoder give up with
//! the reason, and the caller decodes the file with libjpeg-turbo alone:
//! this path may make a decode faster, never change its outcome.

/// Zigzag position to the coefficient's index in the block (row by row),
/// with libjpeg's 16 extra entries so that a run past the band cannot index
/// out of the table.
const NATURAL: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
];

/// The most blocks an interleaved MCU may hold (libjpeg's D_MAX_BLOCKS_IN_MCU).
const MAX_BLOCKS_IN_MCU: usize = 10;

/// libjpeg smooths the blocks of a progressive image whose first nine AC
/// coefficients are not all known to their last bit (jdcoefct.c,
/// `smoothing_ok`, SAVED_COEFS); a one-scan decode never does.
const SMOOTHED_COEFFICIENTS: usize = 10;

/// One component's coefficients.
pub struct Plane {
    /// 64 coefficients a block, in natural order, blocks row by row.
    pub blocks: Vec<[i16; 64]>,
    /// Blocks a row, padded as an interleaved MCU row pads them.
    pub blocks_per_row: usize,
    /// Rows of blocks, padded likewise.
    pub rows: usize,
}

/// A progressive JPEG's coefficients, with the header that makes libjpeg
/// read them as a sequential file's.
pub struct Coefficients {
    /// The file's segments before its first scan (tables, frame, APPn),
    /// its frame marked sequential and its restart interval dropped, then
    /// one scan of every component, then the end of the image.
    pub header: Vec<u8>,
    /// In the frame's order.
    pub planes: Vec<Plane>,
    pub width: usize,
    pub height: usize,
}

/// A component of the frame, with the coefficients decoded so far.
struct Component {
    id: u8,
    h: usize,
    v: usize,
    width_in_blocks: usize,
    height_in_blocks: usize,
    blocks_per_row: usize,
    blocks: Vec<[i16; 64]>,
    /// Bit k: the coefficient at zigzag position k is nonzero.
    nonzero: Vec<u64>,
    /// libjpeg's `coef_bits`: the bit each coefficient is known down to, or
    /// -1 before any scan has coded it.
    known_to: [i32; 64],
}

struct Frame {
    width: usize,
    height: usize,
    components: Vec<Component>,
    mcus_per_row: usize,
    mcu_rows: usize,
}

/// Decodes `bytes` if it is a progressive (SOF2) JPEG whose coefficients
/// libjpeg would decode without a warning and not smooth, holding at most
/// `budget` bytes of coefficients.
pub fn decode(bytes: &[u8], budget: u64) -> Result<Coefficients, String> {
    if bytes.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err("no start-of-image marker".into());
    }
    let mut header = vec![0xFF, 0xD8];
    let mut frame: Option<Frame> = None;
    let mut dc_tables: [Option<Huffman>; 4] = Default::default();
    let mut ac_tables: [Option<Huffman>; 4] = Default::default();
    let mut restart_interval = 0usize;
    let mut scans = 0usize;
    let mut data = Vec::new();
    let mut pos = 2;
    loop {
        // libjpeg warns of bytes between segments; fill bytes are allowed.
        if bytes.get(pos) != Some(&0xFF) {
            return Err(format!("no marker at byte {pos}"));
        }
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let start = pos - 1;
        let code = *bytes.get(pos).ok_or("the file ends in a marker")?;
        pos += 1;
        if code == 0xD9 {
            break;
        }
        let length = match bytes.get(pos..pos + 2) {
            Some(&[high, low]) => usize::from(u16::from_be_bytes([high, low])),
            _ => return Err("the file ends in a marker's length".into()),
        };
        let end = pos + length;
        let segment = bytes.get(pos + 2..end).filter(|_| length >= 2).ok_or("a segment runs past the file")?;
        match code {
            0xC2 if frame.is_none() => frame = Some(read_frame(segment, budget)?),
            0xC0..=0xCF if code != 0xC4 && code != 0xC8 && code != 0xCC => {
                return Err(format!("a frame of type {code:#X}, not one progressive Huffman frame"));
            }
            0xC4 => read_tables(segment, &mut dc_tables, &mut ac_tables)?,
            0xDB if scans > 0 => return Err("quantization tables after the first scan".into()),
            0xDD => {
                let &[high, low] = segment else { return Err("a restart interval of bad length".into()) };
                restart_interval = usize::from(u16::from_be_bytes([high, low]));
            }
            0xDA => {
                let frame = frame.as_mut().ok_or("a scan before the frame")?;
                if scans == 0 {
                    header.extend(one_scan(frame));
                }
                scans += 1;
                let scan = read_scan(segment, frame, &dc_tables, &ac_tables)?;
                let (next, intervals) = unstuff(bytes, end, &mut data)?;
                decode_scan(frame, &scan, restart_interval, &data, &intervals)?;
                pos = next;
                continue;
            }
            // libjpeg reads a JFIF segment wherever it is, and may warn;
            // after the first scan, the header handed on would lack it.
            0xE0 if scans > 0 => return Err("an APP0 segment after the first scan".into()),
            0xDB | 0xE0..=0xEF | 0xFE => {}
            _ => return Err(format!("a marker {code:#X}")),
        }
        if scans == 0 && code != 0xDD {
            let at = header.len();
            header.extend_from_slice(&bytes[start..end]);
            if code == 0xC2 {
                // SOF1, extended sequential: the same frame, read as one scan.
                header[at + 1] = 0xC1;
            }
        }
        pos = end;
    }
    let frame = frame.ok_or("no frame")?;
    if scans == 0 {
        return Err("no scan".into());
    }
    if frame.components.iter().any(|c| c.known_to[..SMOOTHED_COEFFICIENTS].iter().any(|&bits| bits != 0)) {
        return Err("coefficients left unrefined, which libjpeg smooths".into());
    }
    let planes = frame
        .components
        .into_iter()
        .map(|c| Plane { rows: c.blocks.len() / c.blocks_per_row, blocks: c.blocks, blocks_per_row: c.blocks_per_row })
        .collect();
    header.extend_from_slice(&[0xFF, 0xD9]);
    Ok(Coefficients { header, planes, width: frame.width, height: frame.height })
}

/// The SOS segment of one scan of all of `frame`'s components, all
/// coefficients to their last bit, with tables 0 (never read).
fn one_scan(frame: &Frame) -> Vec<u8> {
    let n = frame.components.len();
    let mut sos = vec![0xFF, 0xDA, 0, (6 + 2 * n) as u8, n as u8];
    for c in &frame.components {
        sos.extend_from_slice(&[c.id, 0x00]);
    }
    sos.extend_from_slice(&[0, 63, 0]);
    sos
}

fn read_frame(segment: &[u8], budget: u64) -> Result<Frame, String> {
    let [precision, h0, h1, w0, w1, count, rest @ ..] = segment else { return Err("a short frame header".into()) };
    if *precision != 8 {
        return Err(format!("{precision}-bit samples"));
    }
    let height = usize::from(u16::from_be_bytes([*h0, *h1]));
    let width = usize::from(u16::from_be_bytes([*w0, *w1]));
    if width == 0 || height == 0 {
        return Err("a side of 0 (a height given later, in a DNL segment)".into());
    }
    let count = usize::from(*count);
    if !matches!(count, 1 | 3) || rest.len() != 3 * count {
        return Err(format!("{count} components"));
    }
    let mut components = Vec::with_capacity(count);
    for spec in rest.chunks_exact(3) {
        let (id, h, v, table) = (spec[0], usize::from(spec[1] >> 4), usize::from(spec[1] & 15), spec[2]);
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) || table > 3 {
            return Err("a component's sampling or table out of range".into());
        }
        if components.iter().any(|c: &Component| c.id == id) {
            return Err(format!("component {id} twice"));
        }
        components.push(Component {
            id,
            h,
            v,
            width_in_blocks: 0,
            height_in_blocks: 0,
            blocks_per_row: 0,
            blocks: Vec::new(),
            nonzero: Vec::new(),
            known_to: [-1; 64],
        });
    }
    let max_h = components.iter().map(|c| c.h).max().unwrap_or(1);
    let max_v = components.iter().map(|c| c.v).max().unwrap_or(1);
    if components.len() > 1 && components.iter().map(|c| c.h * c.v).sum::<usize>() > MAX_BLOCKS_IN_MCU {
        return Err("more blocks to an MCU than libjpeg takes".into());
    }
    // jdinput.c: initial_setup and per_scan_setup.
    let mcus_per_row = width.div_ceil(max_h * 8);
    let mcu_rows = height.div_ceil(max_v * 8);
    // The coefficients and their masks, then the pixels made from them.
    let blocks: usize = components.iter().map(|c| mcus_per_row * c.h * mcu_rows * c.v).sum();
    let needs = blocks as u64 * (size_of::<[i16; 64]>() + size_of::<u64>()) as u64 + (width * height * 3) as u64;
    if needs > budget {
        return Err(format!("{needs} bytes of coefficients, over the budget of {budget}"));
    }
    for c in &mut components {
        c.width_in_blocks = (width * c.h).div_ceil(max_h * 8);
        c.height_in_blocks = (height * c.v).div_ceil(max_v * 8);
        c.blocks_per_row = mcus_per_row * c.h;
        let n = c.blocks_per_row * mcu_rows * c.v;
        c.blocks = vec![[0; 64]; n];
        c.nonzero = vec![0; n];
    }
    Ok(Frame { width, height, components, mcus_per_row, mcu_rows })
}

/// A DHT segment's tables into their slots (jdmarker.c, get_dht).
fn read_tables(mut segment: &[u8], dc: &mut [Option<Huffman>; 4], ac: &mut [Option<Huffman>; 4]) -> Result<(), String> {
    while !segment.is_empty() {
        let (&index, rest) = segment.split_first().ok_or("a short table")?;
        let counts: [u8; 16] = rest.get(..16).and_then(|c| c.try_into().ok()).ok_or("a short table")?;
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        let values = rest.get(16..16 + total).filter(|_| total <= 256).ok_or("a Huffman table of bad length")?;
        let table = Huffman::new(&counts, values)?;
        match index {
            0..=3 => dc[usize::from(index)] = Some(table),
            0x10..=0x13 => ac[usize::from(index - 0x10)] = Some(table),
            _ => return Err(format!("a Huffman table numbered {index:#X}")),
        }
        segment = &rest[16 + total..];
    }
    Ok(())
}

struct Scan {
    /// Frame index, DC table, AC table of each component in the scan.
    components: Vec<(usize, Option<Huffman>, Option<Huffman>)>,
    start: usize,
    end: usize,
    high: u32,
    low: u32,
}

/// An SOS segment, checked as libjpeg checks it (jdmarker.c get_sos,
/// jdphuff.c start_pass_phuff_decoder); its progression is recorded in the
/// components' `known_to`.
fn read_scan(
    segment: &[u8],
    frame: &mut Frame,
    dc_tables: &[Option<Huffman>; 4],
    ac_tables: &[Option<Huffman>; 4],
) -> Result<Scan, String> {
    let (&count, rest) = segment.split_first().ok_or("a short scan header")?;
    let count = usize::from(count);
    if count == 0 || count > 4 || rest.len() != 2 * count + 3 {
        return Err("a scan header of bad length".into());
    }
    let (start, end) = (usize::from(rest[2 * count]), usize::from(rest[2 * count + 1]));
    let (high, low) = (u32::from(rest[2 * count + 2] >> 4), u32::from(rest[2 * count + 2] & 15));
    let dc_band = start == 0;
    let bad = if dc_band { end != 0 } else { start > end || end > 63 || count != 1 }
        || (high != 0 && low + 1 != high)
        || low > 13;
    if bad {
        return Err(format!("a bad progression: Ss={start} Se={end} Ah={high} Al={low}"));
    }
    let mut components = Vec::with_capacity(count);
    for spec in rest[..2 * count].chunks_exact(2) {
        let index = frame.components.iter().position(|c| c.id == spec[0]).ok_or("a scan of an unknown component")?;
        // libjpeg takes an interleaved scan's components in the frame's
        // order only, and some other orders (jdmarker.c, get_sos).
        if components.last().is_some_and(|(last, _, _)| *last >= index) {
            return Err("a scan's components out of the frame's order".into());
        }
        let (dc, ac) = (usize::from(spec[1] >> 4), usize::from(spec[1] & 15));
        if dc > 3 || ac > 3 {
            return Err("a scan's table out of range".into());
        }
        let dc = match dc_band && high == 0 {
            true => Some(dc_tables[dc].clone().filter(|t| t.dc_ok).ok_or("a DC table missing or bad")?),
            false => None,
        };
        let ac = match dc_band {
            false => Some(ac_tables[ac].clone().ok_or("an AC table missing")?),
            true => None,
        };
        let known_to = &mut frame.components[index].known_to;
        if !dc_band && known_to[0] < 0 {
            return Err("AC coefficients before their DC".into());
        }
        for bits in &mut known_to[start..=end] {
            if high as i32 != (*bits).max(0) {
                return Err("a scan out of order".into());
            }
            // libjpeg takes a first scan of coefficients known to bit 0 again,
            // and would overwrite them, maybe with 0, which the masks of
            // nonzero coefficients are not kept for.
            if high == 0 && *bits >= 0 {
                return Err("a band's first scan coded twice".into());
            }
            *bits = low as i32;
        }
        components.push((index, dc, ac));
    }
    if count > 1
        && components.iter().map(|(i, _, _)| frame.components[*i].h * frame.components[*i].v).sum::<usize>()
            > MAX_BLOCKS_IN_MCU
    {
        return Err("more blocks to an MCU than libjpeg takes".into());
    }
    Ok(Scan { components, start, end, high, low })
}

/// The entropy-coded data from `from` to the marker that ends it, with its
/// stuffed zeros taken out, into `data`; the offsets in `data` where each
/// restart interval ends; and where the next marker is.
///
/// As libjpeg reads it (jdhuff.c, jpeg_fill_bit_buffer): 0xFF, any more
/// 0xFF, then 0 is a data byte of 0xFF; anything else is a marker.
fn unstuff(bytes: &[u8], from: usize, data: &mut Vec<u8>) -> Result<(usize, Vec<usize>), String> {
    data.clear();
    let mut intervals = Vec::new();
    let mut pos = from;
    loop {
        let rest = bytes.get(pos..).unwrap_or_default();
        let Some(ff) = memchr::memchr(0xFF, rest) else { return Err("the file ends in a scan".into()) };
        data.extend_from_slice(&rest[..ff]);
        let marker = pos + ff;
        let mut at = marker + 1;
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        match bytes.get(at) {
            None => return Err("the file ends in a scan".into()),
            Some(0) => data.push(0xFF),
            Some(&code @ 0xD0..=0xD7) => {
                if usize::from(code - 0xD0) != intervals.len() % 8 {
                    return Err("restart markers out of order".into());
                }
                intervals.push(data.len());
            }
            Some(_) => {
                intervals.push(data.len());
                return Ok((marker, intervals));
            }
        }
        pos = at + 1;
    }
}

/// Why a scan's data cannot be decoded here; cheap to return from the hot
/// loops, where a `String` would be carried through memory.
type Corrupt = &'static str;

/// One scan's blocks decoded into the frame.
fn decode_scan(
    frame: &mut Frame,
    scan: &Scan,
    restart_interval: usize,
    data: &[u8],
    intervals: &[usize],
) -> Result<(), String> {
    let single = scan.components.len() == 1;
    let (mcus_per_row, mcu_rows) = match single {
        true => {
            let c = &frame.components[scan.components[0].0];
            (c.width_in_blocks, c.height_in_blocks)
        }
        false => (frame.mcus_per_row, frame.mcu_rows),
    };
    let wanted_intervals = match restart_interval {
        0 => 1,
        n => (mcus_per_row * mcu_rows).div_ceil(n).max(1),
    };
    if intervals.len() != wanted_intervals {
        return Err(format!("{} restart intervals where {wanted_intervals} were due", intervals.len()));
    }
    let walk = Walk { mcus_per_row, mcu_rows, restart_interval, data, intervals };
    let (start, end, low) = (scan.start, scan.end, scan.low);
    let band = Band { start, end, low };
    let refine = scan.high != 0;
    if !single {
        // Interleaved scans are DC scans (read_scan refuses others).
        return match refine {
            false => dc_first_scan(&walk, scan, &mut frame.components, low),
            true => dc_refine_scan(&walk, scan, &mut frame.components, low),
        };
    }
    let (index, dc, ac) = &scan.components[0];
    let c = &mut frame.components[*index];
    let stride = c.blocks_per_row;
    let (blocks, nonzero) = (&mut c.blocks[..], &mut c.nonzero[..]);
    match (start == 0, refine, dc, ac) {
        (true, false, Some(table), _) => walk.run(|bits, state, row, column| {
            dc_first(bits, table, low, &mut state.last_dc[0], &mut blocks[row * stride + column])
        }),
        (true, true, _, _) => walk.run(|bits, _, row, column| {
            dc_refine(bits, low, &mut blocks[row * stride + column]);
            Ok(())
        }),
        (false, false, _, Some(table)) => band_scan(&walk, table, band, stride, blocks, nonzero, ac_first),
        #[cfg(target_arch = "x86_64")]
        (false, true, _, Some(table)) if wide::available() => {
            // SAFETY: the CPU has the features `wide::refine_scan` is compiled for.
            unsafe { wide::refine_scan(&walk, table, band, stride, blocks, nonzero) }
        }
        (false, true, _, Some(table)) => band_scan(&walk, table, band, stride, blocks, nonzero, ac_refine::<false>),
        _ => Err("a scan without its table".into()),
    }
}

/// An interleaved DC scan's first bits, in a function of its own as
/// [`band_scan`] is.
#[inline(never)]
fn dc_first_scan(walk: &Walk, scan: &Scan, components: &mut [Component], low: u32) -> Result<(), String> {
    walk.run(|bits, state, row, column| {
        for (slot, (index, dc, _)) in scan.components.iter().enumerate() {
            let table = dc.as_ref().ok_or("no DC table")?;
            let c = &mut components[*index];
            for y in 0..c.v {
                for x in 0..c.h {
                    let block = &mut c.blocks[(row * c.v + y) * c.blocks_per_row + column * c.h + x];
                    dc_first(bits, table, low, &mut state.last_dc[slot], block)?;
                }
            }
        }
        Ok(())
    })
}

/// An interleaved DC scan's refinement bits, in a function of its own as
/// [`band_scan`] is.
#[inline(never)]
fn dc_refine_scan(walk: &Walk, scan: &Scan, components: &mut [Component], low: u32) -> Result<(), String> {
    walk.run(|bits, _, row, column| {
        for (index, _, _) in &scan.components {
            let c = &mut components[*index];
            for y in 0..c.v {
                for x in 0..c.h {
                    dc_refine(bits, low, &mut c.blocks[(row * c.v + y) * c.blocks_per_row + column * c.h + x]);
                }
            }
        }
        Ok(())
    })
}

/// An AC scan of one component, decoded by `decode` (`ac_first` or
/// `ac_refine`), in a function of its own for each: inlined into the
/// function of every scan, the refinement loop, where most of the decoding
/// time goes, lost registers to the others and was 5% slower.
#[inline(never)]
fn band_scan(
    walk: &Walk,
    table: &Huffman,
    band: Band,
    stride: usize,
    blocks: &mut [[i16; 64]],
    nonzero: &mut [u64],
    decode: impl Fn(&mut Bits, &Huffman, Band, &mut u32, &mut [i16; 64], &mut u64) -> Result<(), Corrupt>,
) -> Result<(), String> {
    walk.run(|bits, state, row, column| {
        let at = row * stride + column;
        decode(bits, table, band, &mut state.eobrun, &mut blocks[at], &mut nonzero[at])
    })
}

/// A scan's MCUs in order, over its restart intervals.
struct Walk<'a> {
    mcus_per_row: usize,
    mcu_rows: usize,
    restart_interval: usize,
    data: &'a [u8],
    /// Where each interval's data ends; as many as the scan has intervals.
    intervals: &'a [usize],
}

/// What starts over at each restart interval.
#[derive(Default)]
struct State {
    last_dc: [i32; 4],
    eobrun: u32,
}

impl Walk<'_> {
    /// Calls `mcu` for each MCU (row, column) with the interval's bits. The
    /// bit reader is a local here, and `mcu` inlines, so its fields can live
    /// in registers through the hot loops.
    #[inline(always)]
    fn run<F>(&self, mut mcu: F) -> Result<(), String>
    where
        F: FnMut(&mut Bits, &mut State, usize, usize) -> Result<(), Corrupt>,
    {
        let mut state = State::default();
        let mut interval = 0;
        let mut bits = Bits::new(&self.data[..self.intervals[0]]);
        let mut left = self.restart_interval;
        for row in 0..self.mcu_rows {
            for column in 0..self.mcus_per_row {
                if self.restart_interval != 0 {
                    if left == 0 {
                        bits.finish()?;
                        interval += 1;
                        let from = self.intervals[interval - 1];
                        bits = Bits::new(&self.data[from..self.intervals[interval]]);
                        state = State::default();
                        left = self.restart_interval;
                    }
                    left -= 1;
                }
                mcu(&mut bits, &mut state, row, column)?;
            }
        }
        bits.finish()?;
        if interval + 1 != self.intervals.len() {
            return Err("restart markers left over".into());
        }
        Ok(())
    }
}

/// jdphuff.c, decode_mcu_DC_first, for one block.
#[inline(always)]
fn dc_first(bits: &mut Bits, table: &Huffman, low: u32, last: &mut i32, block: &mut [i16; 64]) -> Result<(), Corrupt> {
    let size = u32::from(table.decode(bits)?);
    let difference = match size {
        0 => 0,
        size => extend(bits.take(size), size),
    };
    *last = last.checked_add(difference).ok_or("a DC coefficient out of range")?;
    block[0] = ((*last as u32) << low) as i16;
    Ok(())
}

/// jdphuff.c, decode_mcu_DC_refine, for one block.
#[inline(always)]
fn dc_refine(bits: &mut Bits, low: u32, block: &mut [i16; 64]) {
    if bits.bit() {
        block[0] |= 1 << low;
    }
}

/// An AC scan's band, zigzag positions `start..=end`, and the bit its
/// values are shifted to (Al).
#[derive(Clone, Copy)]
struct Band {
    start: usize,
    end: usize,
    low: u32,
}

/// jdphuff.c, decode_mcu_AC_first.
#[inline(always)]
fn ac_first(
    bits: &mut Bits,
    table: &Huffman,
    Band { start, end, low }: Band,
    eobrun: &mut u32,
    block: &mut [i16; 64],
    nonzero: &mut u64,
) -> Result<(), Corrupt> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = start;
    while k <= end {
        let symbol = table.decode(bits)?;
        let (run, size) = (usize::from(symbol >> 4), u32::from(symbol & 15));
        if size != 0 {
            k += run;
            if k > end {
                return Err("a coefficient past its band");
            }
            let value = ((extend(bits.take(size), size) as u32) << low) as i16;
            block[NATURAL[k & 63]] = value;
            // Set once: read_scan refuses a band's first scan coded again.
            *nonzero |= u64::from(value != 0) << k;
        } else if run == 15 {
            k += 15;
        } else {
            *eobrun = (1 << run) + bits.take(run as u32) - 1;
            break;
        }
        k += 1;
    }
    Ok(())
}

/// jdphuff.c, decode_mcu_AC_refine, with the band's nonzero coefficients
/// found from the block's mask rather than by walking the band. `WIDE`:
/// the corrections by [`wide::correct`], which only code compiled for its
/// features may instantiate.
#[inline(always)]
fn ac_refine<const WIDE: bool>(
    bits: &mut Bits,
    table: &Huffman,
    Band { start, end, low }: Band,
    eobrun: &mut u32,
    block: &mut [i16; 64],
    nonzero: &mut u64,
) -> Result<(), Corrupt> {
    let one = 1i16 << low;
    let band = (u64::MAX >> (63 - end)) & (u64::MAX << start);
    let mut k = start;
    if *eobrun == 0 {
        while k <= end {
            let symbol = table.decode(bits)?;
            let (mut run, size) = (symbol >> 4, symbol & 15);
            let mut new = 0;
            if size != 0 {
                if size != 1 {
                    return Err("a refinement of more than one bit");
                }
                new = if bits.bit() { one } else { -one };
            } else if run != 15 {
                *eobrun = (1 << run) + bits.take(u32::from(run));
                break;
            }
            // The run ends on its (run + 1)th zero from k; the nonzero
            // coefficients passed on the way take a correction bit each.
            let ahead = band & (u64::MAX << k);
            let mut zeros = ahead & !*nonzero;
            // Most runs are short: their first zeros are cleared without a
            // branch to mispredict, the rest in a loop.
            for i in 0..3 {
                zeros &= zeros.wrapping_sub(u64::from(run > i));
            }
            run = run.saturating_sub(3);
            while run > 0 {
                zeros &= zeros.wrapping_sub(1);
                run -= 1;
            }
            let target = if zeros == 0 { end + 1 } else { zeros.trailing_zeros() as usize };
            let before = if target >= 64 { u64::MAX } else { (1 << target) - 1 };
            corrections::<WIDE>(bits, block, ahead & before & *nonzero, one);
            if new != 0 {
                if target > end {
                    return Err("a coefficient past its band");
                }
                block[NATURAL[target & 63]] = new;
                *nonzero |= 1 << target;
            }
            k = target + 1;
        }
    }
    if *eobrun > 0 {
        if k <= end {
            corrections::<WIDE>(bits, block, band & (u64::MAX << k) & *nonzero, one);
        }
        *eobrun -= 1;
    }
    Ok(())
}

#[inline(always)]
fn corrections<const WIDE: bool>(bits: &mut Bits, block: &mut [i16; 64], positions: u64, one: i16) {
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: only `wide::refine_scan`, compiled for `wide::correct`'s features, instantiates WIDE.
        unsafe { wide::correct(bits, block, positions, one) };
        return;
    }
    correct(bits, block, positions, one)
}

/// One correction bit for each coefficient in `positions` (zigzag order):
/// a set bit moves the coefficient `one` further from zero, unless that
/// bit of it is set already (jdphuff.c).
#[inline(always)]
fn correct(bits: &mut Bits, block: &mut [i16; 64], mut positions: u64, one: i16) {
    while positions != 0 {
        if bits.count == 0 {
            bits.refill();
        }
        let at = NATURAL[positions.trailing_zeros() as usize] & 63;
        positions &= positions - 1;
        let value = block[at];
        let raise = (bits.word >> 63) as i16 & i16::from(value & one == 0);
        bits.word <<= 1;
        bits.count -= 1;
        // `value >> 15 | 1` is its sign, as -1 or 1.
        block[at] = value.wrapping_add((value >> 15 | 1) * one * raise);
    }
}

/// The refinement scans with AVX-512's bit shuffles: a call's correction
/// bits are read at once and applied to the block's coefficients in two
/// vector operations, without the loop over them whose end the CPU cannot
/// predict.
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bitalg")
            && is_x86_feature_detected!("bmi2")
            && is_x86_feature_detected!("popcnt")
    }

    /// Each coefficient's zigzag position, by its index in the block: NATURAL's inverse.
    const ZIGZAG: [u8; 64] = {
        let mut zigzag = [0u8; 64];
        let mut k = 0;
        while k < 64 {
            zigzag[NATURAL[k]] = k as u8;
            k += 1;
        }
        zigzag
    };

    /// [`band_scan`] of [`ac_refine`] with [`correct`]. Its own walk, not
    /// `band_scan`'s body shared through a generic function: tried, LLVM
    /// then left one of the two calls to `correct` out of line, and the
    /// scans took 2-5% longer.
    #[target_feature(enable = "avx512f,avx512bw,avx512bitalg,bmi2,popcnt")]
    #[inline(never)]
    pub(super) fn refine_scan(
        walk: &Walk,
        table: &Huffman,
        band: Band,
        stride: usize,
        blocks: &mut [[i16; 64]],
        nonzero: &mut [u64],
    ) -> Result<(), String> {
        walk.run(|bits, state, row, column| {
            let at = row * stride + column;
            ac_refine::<true>(bits, table, band, &mut state.eobrun, &mut blocks[at], &mut nonzero[at])
        })
    }

    /// [`super::correct`]: the bits for `positions`, first read for the
    /// lowest, deposited on them, turned from zigzag to natural order, and
    /// each coefficient whose bit is set and whose bit `one` is not moved
    /// `one` away from zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512bitalg,bmi2,popcnt")]
    #[inline]
    pub(super) fn correct(bits: &mut Bits, block: &mut [i16; 64], positions: u64, one: i16) {
        if positions == 0 {
            return;
        }
        // 1..=63: the positions are a band's, which never holds the DC.
        let n = positions.count_ones();
        let read = if n <= 32 {
            u64::from(bits.take(n))
        } else {
            let first = u64::from(bits.take(n - 32));
            first << 32 | u64::from(bits.take(32))
        };
        let in_order = read.reverse_bits() >> (64 - n);
        let raise = _pdep_u64(in_order, positions);
        // SAFETY: reads the 64 bytes of ZIGZAG.
        let zigzag = unsafe { _mm512_loadu_si512(ZIGZAG.as_ptr().cast()) };
        let natural = _mm512_bitshuffle_epi64_mask(_mm512_set1_epi64(raise as i64), zigzag);
        let one = _mm512_set1_epi16(one);
        for (half, coefficients) in block.chunks_exact_mut(32).enumerate() {
            // SAFETY: `coefficients` is 32 i16, the 64 bytes read and written.
            let values = unsafe { _mm512_loadu_si512(coefficients.as_ptr().cast()) };
            let raised = (natural >> (32 * half)) as u32 & _mm512_testn_epi16_mask(values, one);
            // One away from zero: `one` where the value is positive, -`one` where negative (none is zero).
            let sign = _mm512_srai_epi16::<15>(values);
            let step = _mm512_sub_epi16(_mm512_xor_si512(one, sign), sign);
            let values = _mm512_mask_add_epi16(values, raised, values, step);
            // SAFETY: as the load.
            unsafe { _mm512_storeu_si512(coefficients.as_mut_ptr().cast(), values) };
        }
    }
}

/// Figure F.12: the `size`-bit value `bits` as a signed difference.
#[inline(always)]
fn extend(bits: u32, size: u32) -> i32 {
    if bits < 1 << (size - 1) { bits as i32 + (-1i32 << size) + 1 } else { bits as i32 }
}

/// The bits of one restart interval's unstuffed data, most significant
/// first. Past the data it reads zeros; [`Bits::finish`] says whether it
/// went there, which libjpeg warns of.
#[derive(Clone, Copy)]
struct Bits<'a> {
    data: &'a [u8],
    /// The next byte to load.
    pos: usize,
    /// Loaded bits, the next one highest; below `count` bits it may hold
    /// some of the byte at `pos` already, never anything else.
    word: u64,
    count: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8]) -> Self {
        Bits { data, pos: 0, word: 0, count: 0 }
    }

    /// At least 57 bits loaded; called with fewer than 32.
    #[inline(always)]
    fn refill(&mut self) {
        debug_assert!(self.count < 32);
        if let Some(&chunk) = self.data.get(self.pos..).and_then(|rest| rest.first_chunk::<8>()) {
            self.word |= u64::from_be_bytes(chunk) >> self.count;
            let bytes = (64 - self.count) / 8;
            self.pos += bytes as usize;
            self.count += bytes * 8;
        } else {
            *self = self.refilled_near_the_end();
        }
    }

    /// The last bytes one at a time, then zeros. By value, so that the
    /// reader in the hot loops never has its address taken.
    #[cold]
    #[inline(never)]
    fn refilled_near_the_end(mut self) -> Self {
        while self.count <= 56 {
            let byte = self.data.get(self.pos).copied().unwrap_or(0);
            self.word |= u64::from(byte) << (56 - self.count);
            self.pos += 1;
            self.count += 8;
        }
        self
    }

    #[inline(always)]
    fn bit(&mut self) -> bool {
        if self.count == 0 {
            self.refill();
        }
        let bit = self.word >> 63 != 0;
        self.word <<= 1;
        self.count -= 1;
        bit
    }

    /// The next `n` bits (at most 32) as a number.
    #[inline(always)]
    fn take(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.count < n {
            self.refill();
        }
        let value = (self.word >> (64 - n)) as u32;
        self.word <<= n;
        self.count -= n;
        value
    }

    /// The end of the interval: it must have ended within its data, and
    /// without a whole byte unread (libjpeg counts those as extraneous).
    fn finish(self) -> Result<(), String> {
        let read = self.pos as u64 * 8 - u64::from(self.count);
        let have = self.data.len() as u64 * 8;
        if read > have {
            return Err("a scan's data ends too soon".into());
        }
        if have - read >= 8 {
            return Err(format!("{} bytes left over after a scan's data", (have - read) / 8));
        }
        Ok(())
    }
}

/// Bits looked up at once by [`Huffman::decode`]; longer codes are found
/// by length, as libjpeg finds them.
const FAST_BITS: u32 = 9;

/// A Huffman table as jdhuff.c's jpeg_make_d_derived_tbl derives it.
#[derive(Clone)]
struct Huffman {
    /// By the next FAST_BITS bits: code length << 8 | symbol, or 0 for a
    /// longer code.
    fast: [u16; 1 << FAST_BITS],
    /// By length: the largest code of that length, or -1.
    maxcode: [i32; 18],
    valoffset: [i32; 17],
    values: [u8; 256],
    /// Every symbol is at most 15, as a DC table's must be.
    dc_ok: bool,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: &[u8]) -> Result<Huffman, String> {
        let mut table = Huffman {
            fast: [0; 1 << FAST_BITS],
            maxcode: [-1; 18],
            valoffset: [0; 17],
            values: [0; 256],
            dc_ok: values.iter().all(|&v| v <= 15),
        };
        table.values[..values.len()].copy_from_slice(values);
        let mut code = 0u32;
        let mut p = 0usize;
        for length in 1..=16u32 {
            let count = usize::from(counts[length as usize - 1]);
            if count > 0 {
                table.valoffset[length as usize] = p as i32 - code as i32;
                for _ in 0..count {
                    // No code may be all ones (JERR_BAD_HUFF_TABLE).
                    if code + 1 >= 1 << length {
                        return Err("a bad Huffman table".into());
                    }
                    if length <= FAST_BITS {
                        let shift = FAST_BITS - length;
                        let first = (code << shift) as usize;
                        let entry = (length as u16) << 8 | u16::from(values[p]);
                        table.fast[first..first + (1 << shift)].fill(entry);
                    }
                    code += 1;
                    p += 1;
                }
                table.maxcode[length as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        Ok(table)
    }

    #[inline(always)]
    fn decode(&self, bits: &mut Bits) -> Result<u8, Corrupt> {
        if bits.count < 32 {
            bits.refill();
        }
        let entry = self.fast[(bits.word >> (64 - FAST_BITS)) as usize];
        let (length, symbol) = match entry {
            0 => self.decode_long((bits.word >> 48) as u32).ok_or("a bad Huffman code")?,
            entry => (u32::from(entry >> 8), entry as u8),
        };
        bits.word <<= length;
        bits.count -= length;
        Ok(symbol)
    }

    /// A code longer than FAST_BITS in the next 16 bits: its length and symbol.
    #[cold]
    #[inline(never)]
    fn decode_long(&self, peek: u32) -> Option<(u32, u8)> {
        (FAST_BITS + 1..=16).find_map(|length| {
            let code = (peek >> (16 - length)) as i32;
            let at = code + self.valoffset[length as usize];
            (code <= self.maxcode[length as usize]).then(|| Some((length, *self.values.get(at as usize)?))).flatten()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector corrections against the loop, on random blocks, bands of
    /// nonzero coefficients and bits: the same coefficients, and the same
    /// bits read.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn wide_corrections_are_the_loops() {
        if !wide::available() {
            eprintln!("skipped: this CPU lacks AVX-512 BITALG, BMI2 or POPCNT");
            return;
        }
        let mut next = crate::image::testing::numbers(17);
        for case in 0..20_000 {
            let low = next() % 8;
            let one = 1i16 << low;
            let mut block = [0i16; 64];
            let mut nonzero = 0u64;
            for (k, &natural) in NATURAL[..64].iter().enumerate() {
                if k > 0 && !next().is_multiple_of(3) {
                    // Some with bit `one` set, which a correction leaves as it is.
                    let magnitude = ((next() % 200 + 1) as i16 * one) | ((next() % 2) as i16 * one);
                    block[natural] = if next().is_multiple_of(2) { magnitude } else { -magnitude };
                    nonzero |= 1 << k;
                }
            }
            // Bands of every width, and sometimes a single coefficient or none.
            let start = 1 + next() as usize % 63;
            let end = start + next() as usize % (64 - start);
            let band = (u64::MAX >> (63 - end)) & (u64::MAX << start);
            let positions = match case % 4 {
                0 => band & nonzero & u64::from(next()),
                1 => band & nonzero & (1 << start),
                _ => band & nonzero,
            };
            let data: Vec<u8> = (0..24).map(|_| next() as u8).collect();
            let (mut ours, mut theirs) = (block, block);
            let (mut ours_bits, mut theirs_bits) = (Bits::new(&data), Bits::new(&data));
            // Part of the reader's word used already, as in a scan.
            let skip = next() % 40;
            ours_bits.take(skip);
            theirs_bits.take(skip);
            // SAFETY: available() found the features `wide::correct` is compiled for.
            unsafe { wide::correct(&mut ours_bits, &mut ours, positions, one) };
            correct(&mut theirs_bits, &mut theirs, positions, one);
            assert_eq!(ours, theirs, "case {case}: positions {positions:#x}, one {one}");
            // As many bits read, whatever each has loaded ahead, and the same ones next.
            let read = |bits: &Bits| bits.pos * 8 - bits.count as usize;
            assert_eq!(read(&ours_bits), read(&theirs_bits), "case {case}: the bits read");
            assert_eq!(ours_bits.take(32), theirs_bits.take(32), "case {case}: the bits after");
        }
    }
}
