// Host-emulator build (RAAD_EMU) of csrc/cuda/attention_int4.cu as plain C++.
#include "../attention_int4.cu"
