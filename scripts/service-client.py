#!/usr/bin/env python3
"""A service integrating with Flotilla from Python (grpcio), holding only the files
`flotctl credential create NAME --role service ...` wrote. Without generated stubs: requests are
encoded by hand (both are one string field or empty), which is all a check needs.

Usage: service-client.py DIR NAME ADDRESS
Exits 0 when reads are allowed and a write is refused with PERMISSION_DENIED naming the grant."""
import sys

import grpc

directory, name, address = sys.argv[1:4]


def read(file):
    with open(f"{directory}/{file}", "rb") as f:
        return f.read()


credentials = grpc.ssl_channel_credentials(
    root_certificates=read("ca.crt"),
    private_key=read(f"{name}.key"),
    certificate_chain=read(f"{name}.crt"),
)
channel = grpc.secure_channel(
    address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
)
identity = lambda b: b
list_devices = channel.unary_unary(
    "/flotilla.admin.v1.DeviceService/ListDevices",
    request_serializer=identity,
    response_deserializer=identity,
)
list_devices(b"", timeout=10)
print("ListDevices: allowed")
# DeleteDeviceRequest { name = 1: "x" }
delete = channel.unary_unary(
    "/flotilla.admin.v1.DeviceService/DeleteDevice",
    request_serializer=identity,
    response_deserializer=identity,
)
try:
    delete(b"\x0a\x01x", timeout=10)
except grpc.RpcError as error:
    if error.code() != grpc.StatusCode.PERMISSION_DENIED or "DeleteDevice" not in error.details():
        sys.exit(f"unexpected refusal: {error.code()} {error.details()}")
    print(f"DeleteDevice: refused ({error.details()})")
else:
    sys.exit("DeleteDevice was allowed to a viewer service")
