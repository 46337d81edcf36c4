// Host-emulator build (RAAD_EMU) of csrc/cuda/attention_int8.cu as plain C++.
#include "../attention_int8.cu"
