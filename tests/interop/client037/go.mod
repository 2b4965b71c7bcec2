module konnectivity-rs.test/interop/client037

go 1.26.2

require (
	google.golang.org/grpc v1.81.1
	sigs.k8s.io/apiserver-network-proxy/konnectivity-client v0.37.1
)
