# evrouter: one image for every service (router, agent, network adapter).
#
# Build arguments (docker-compose.yml passes them through):
#   PYTHON_IMAGE  the base, python:3.11-slim-bookworm by default; any Debian
#                 bookworm with python3 and its venv module will do (a
#                 machine with no image registry builds one locally, see
#                 tests/compose/images.sh).
# Wheels built elsewhere: put them in .compose-wheels/ of the build context
# (evrouter's dependencies plus setuptools and wheel) and nothing is fetched
# from the package index; without that folder they are built here.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The glob copies .compose-wheels/ when it exists and nothing else matches
# (.dockerignore always does, so the COPY never has zero sources).
COPY .dockerignore .compose-wheel[s] /wheelhouse/
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
        echo "offline: installing from the wheels in the build context"; \
    else \
        apt-get update \
     && apt-get install -y --no-install-recommends gcc libvirt-dev pkg-config \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/evrouter
WORKDIR /src
COPY setup.py README.md ./
COPY router router
COPY compute compute
COPY network network
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; \
    fi \
 && /opt/evrouter/bin/pip wheel --no-cache-dir --use-pep517 --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# libvirt0: the client library libvirt-python links against (the agent talks
# to the host's libvirtd through its bind-mounted socket).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/evrouter evrouter \
 && install -d -o evrouter -g evrouter /var/lib/evrouter \
 && python3 -m venv /opt/evrouter
COPY --from=build /wheels /wheels
RUN /opt/evrouter/bin/pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
# The services and their health checks run `evrouter` and `python` from here.
ENV PATH=/opt/evrouter/bin:$PATH
COPY deploy/evrouter.conf /etc/evrouter/evrouter.conf
# A volume mounted on /var/lib/evrouter (the adapter's spool) starts as a
# copy of this folder, owned by evrouter; without it, by root.
VOLUME /var/lib/evrouter
USER evrouter
ENTRYPOINT ["evrouter"]
CMD ["--help"]
