"""Plain Paddle Qwen2-VL — no distributed code: the model (`modeling_qwen2_vl`, `modeling_vision`, `attention`,
`rope_index`), its config (`config`), the one reader and writer of every weight layout (`weights`, on the file
formats of `formats` and `writers`), the LoRA adapter format (`lora`), processing (`image_processing`, `video`,
`tokenizer`, `processor`), generation (`generation`), the fused chunked head + loss (`loss`) and the project's
logger (`log`). Importing the package picks MKL's AVX2 sgemm on AMD CPUs (`mkl`)."""
from network.mkl import prefer_mkl_avx2

prefer_mkl_avx2()
