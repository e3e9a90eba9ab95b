FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
WORKDIR /work
COPY pyproject.toml README.md ./
COPY kdsweep kdsweep
COPY studies studies
RUN pip install --no-cache-dir .
ENV KDSWEEP_STUDIES=/work/studies
