# evrouter: one image for every service (router, agent, network adapter).
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.py README.md ./
COPY router router
COPY compute compute
COPY network network
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# libvirt0: the client library libvirt-python links against (the agent talks
# to the host's libvirtd through its bind-mounted socket).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/evrouter evrouter
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY deploy/evrouter.conf /etc/evrouter/evrouter.conf
USER evrouter
ENTRYPOINT ["evrouter"]
CMD ["--help"]
