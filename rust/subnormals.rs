//! The kernel computes with IEEE subnormals whatever the thread's
//! floating-point mode. XLA and TensorFlow set flush-to-zero on their threads
//! (x86's FTZ and DAZ, Arm's FZ), and a thread inherits its creator's mode, so
//! without this a chunk's results would depend on the thread that ran it:
//! float16 rounding, which scales float16 subnormals into float32 ones, and
//! any subnormal parameter or moment, would be flushed on some threads only.

/// While alive, the current thread keeps subnormals; the mode it had is restored on drop.
pub struct KeepSubnormals {
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
    saved: Option<u64>,
}

#[cfg(target_arch = "x86_64")]
mod mode {
    use std::arch::asm;

    /// MXCSR's flush-to-zero (FTZ, bit 15) and denormals-are-zero (DAZ, bit 6).
    pub const FLUSHING: u64 = 0x8040;

    pub fn get() -> u64 {
        let mut csr: u32 = 0;
        // SAFETY: stores MXCSR into a local; no other effect.
        unsafe { asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
        u64::from(csr)
    }

    pub fn set(value: u64) {
        let csr = value as u32;
        // SAFETY: loads MXCSR from a value read from it with only FTZ/DAZ changed.
        unsafe { asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags)) };
    }
}

#[cfg(target_arch = "aarch64")]
mod mode {
    use std::arch::asm;

    /// FPCR's flush-to-zero (FZ, bit 24).
    pub const FLUSHING: u64 = 1 << 24;

    pub fn get() -> u64 {
        let fpcr: u64;
        // SAFETY: reads FPCR; no other effect.
        unsafe { asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags)) };
        fpcr
    }

    pub fn set(value: u64) {
        // SAFETY: writes FPCR with a value read from it with only FZ changed.
        unsafe { asm!("msr fpcr, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
    }
}

impl KeepSubnormals {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub fn enter() -> Self {
        let current = mode::get();
        let saved = (current & mode::FLUSHING != 0).then(|| {
            mode::set(current & !mode::FLUSHING);
            current
        });
        Self { saved }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub fn enter() -> Self {
        Self { saved: None }
    }
}

impl Drop for KeepSubnormals {
    fn drop(&mut self) {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if let Some(saved) = self.saved {
            mode::set(saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn subnormals_survive_a_flushing_thread_and_its_mode_is_restored() {
        let tiny = std::hint::black_box(f32::MIN_POSITIVE);
        let half = || std::hint::black_box(tiny) * std::hint::black_box(0.5f32);
        let before = mode::get();
        mode::set(before | mode::FLUSHING);
        assert_eq!(half(), 0.0, "the flushing mode flushes");
        {
            let _keep = KeepSubnormals::enter();
            assert_eq!(half(), f32::MIN_POSITIVE / 2.0);
        }
        assert_eq!(mode::get() & mode::FLUSHING, mode::FLUSHING, "restored");
        mode::set(before);
    }
}
