//! CRC-64/XZ for the spool's records and meta file.

/// CRC-64/XZ (ECMA-182 polynomial, reflected), slicing by 8.
pub(super) struct Crc64(u64);

pub(super) const CRC64_TABLES: [[u64; 256]; 8] = crc64_tables();

const fn crc64_tables() -> [[u64; 256]; 8] {
    const POLY: u64 = 0xC96C_5795_D787_0F42;
    let mut t = [[0u64; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        t[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

impl Crc64 {
    pub(super) fn new() -> Crc64 {
        Crc64(!0)
    }

    pub(super) fn of(data: &[u8]) -> u64 {
        let mut crc = Crc64::new();
        crc.update(data);
        crc.finish()
    }

    pub(super) fn update(&mut self, data: &[u8]) {
        let t = &CRC64_TABLES;
        let mut crc = self.0;
        let mut chunks = data.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let v = crc ^ u64::from_le_bytes(word);
            crc = t[7][(v & 0xff) as usize]
                ^ t[6][((v >> 8) & 0xff) as usize]
                ^ t[5][((v >> 16) & 0xff) as usize]
                ^ t[4][((v >> 24) & 0xff) as usize]
                ^ t[3][((v >> 32) & 0xff) as usize]
                ^ t[2][((v >> 40) & 0xff) as usize]
                ^ t[1][((v >> 48) & 0xff) as usize]
                ^ t[0][(v >> 56) as usize];
        }
        for &b in chunks.remainder() {
            crc = t[0][((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
        }
        self.0 = crc;
    }

    pub(super) fn finish(&self) -> u64 {
        !self.0
    }
}
