// Host-emulator build (RAAD_EMU) of csrc/cuda/attention.cu as plain C++.
#include "../attention.cu"
