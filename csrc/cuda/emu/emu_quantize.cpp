// Host-emulator build (RAAD_EMU) of csrc/cuda/quantize.cu as plain C++.
#include "../quantize.cu"
