//! Custom ops with a backward: STFT/iSTFT, memory-lean attention, RMSNorm, softmax, RoPE.
