// extproc-client asks an endpoint picker which endpoint it would route one request to, over
// the picker's own API: Envoy's ext_proc gRPC stream (envoy.service.ext_proc.v3), as a gateway
// calls it. It sends the request headers, then the JSON body with end_of_stream, and prints
// one JSON line: the endpoint the picker chose (its x-gateway-destination-endpoint header), or
// the immediate response (status and body) it answered with instead.
//
//	extproc-client -addr 127.0.0.1:9002 -body '{"model": "m", "messages": [...]}'
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

type result struct {
	Endpoint        string            `json:"endpoint,omitempty"`
	Headers         map[string]string `json:"headers,omitempty"`
	ImmediateStatus int32             `json:"immediateStatus,omitempty"`
	ImmediateBody   string            `json:"immediateBody,omitempty"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9002", "the picker's ext-proc gRPC address")
	body := flag.String("body", "", "the request's JSON body")
	path := flag.String("path", "/v1/chat/completions", "the request's :path")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of the whole exchange")
	flag.Parse()
	if err := run(*addr, *path, *body, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "extproc-client:", err)
		os.Exit(1)
	}
}

func run(addr, path, body string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	stream, err := extprocv3.NewExternalProcessorClient(conn).Process(ctx)
	if err != nil {
		return err
	}
	headers := map[string]string{
		":method": "POST", ":path": path, ":authority": "kubemaas.test", ":scheme": "http",
		"content-type": "application/json", "content-length": fmt.Sprint(len(body)),
	}
	var values []*corev3.HeaderValue
	for k, v := range headers {
		values = append(values, &corev3.HeaderValue{Key: k, RawValue: []byte(v)})
	}
	if err := stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: values}}}}); err != nil {
		return err
	}
	if err := stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: true}}}); err != nil {
		return err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("no routing decision: %w", err)
		}
		if imm := resp.GetImmediateResponse(); imm != nil {
			return emit(result{ImmediateStatus: int32(imm.GetStatus().GetCode()), ImmediateBody: string(imm.GetBody())})
		}
		if h := resp.GetRequestHeaders(); h != nil {
			out := result{Headers: map[string]string{}}
			for _, opt := range h.GetResponse().GetHeaderMutation().GetSetHeaders() {
				key := strings.ToLower(opt.GetHeader().GetKey())
				value := string(opt.GetHeader().GetRawValue())
				if value == "" {
					value = opt.GetHeader().GetValue()
				}
				out.Headers[key] = value
				if key == "x-gateway-destination-endpoint" {
					out.Endpoint = value
				}
			}
			return emit(out)
		}
	}
}

func emit(r result) error {
	return json.NewEncoder(os.Stdout).Encode(r)
}
