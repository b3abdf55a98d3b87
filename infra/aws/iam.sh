#!/usr/bin/env bash
# Create (or update) the two EC2 instance profiles that ray_cluster.yaml names:
#   hymba-batch-head    the head: the Ray autoscaler launches and terminates the GPU workers
#                       (EC2, passing the worker role, resolving the AMI's SSM parameter) and
#                       the driver lists inputs and commits outputs (S3)
#   hymba-batch-worker  the workers: read weights and input, write output (S3)
# Usage, with credentials allowed to manage IAM:
#   bash infra/aws/iam.sh BUCKET [BUCKET...]     # the buckets holding weights, input and output
# Idempotent: run again to change the bucket list.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 BUCKET [BUCKET...]" >&2
  exit 2
fi

account=$(aws sts get-caller-identity --query Account --output text)
partition=aws

buckets="" objects=""
for b in "$@"; do
  buckets+="${buckets:+,}\"arn:${partition}:s3:::${b}\""
  objects+="${objects:+,}\"arn:${partition}:s3:::${b}/*\""
done

trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
s3_policy='{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":["s3:ListBucket","s3:GetBucketLocation"],"Resource":['"$buckets"']},
 {"Effect":"Allow","Action":["s3:GetObject","s3:PutObject","s3:DeleteObject","s3:AbortMultipartUpload"],"Resource":['"$objects"']}]}'
head_policy='{"Version":"2012-10-17","Statement":[
 {"Effect":"Allow","Action":"iam:PassRole","Resource":"arn:'"$partition"':iam::'"$account"':role/hymba-batch-worker"},
 {"Effect":"Allow","Action":["ssm:GetParameter","ssm:GetParameters"],"Resource":"arn:'"$partition"':ssm:*::parameter/aws/service/deeplearning/*"}]}'

ensure_profile() {  # role + instance profile of the same name
  local name=$1
  if ! aws iam get-role --role-name "$name" >/dev/null 2>&1; then
    aws iam create-role --role-name "$name" --assume-role-policy-document "$trust" >/dev/null
  fi
  if ! aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
  fi
  if ! aws iam get-instance-profile --instance-profile-name "$name" \
       --query 'InstanceProfile.Roles[].RoleName' --output text | grep -qw "$name"; then
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  fi
  aws iam put-role-policy --role-name "$name" --policy-name hymba-batch-s3 --policy-document "$s3_policy"
}

ensure_profile hymba-batch-worker
ensure_profile hymba-batch-head
aws iam attach-role-policy --role-name hymba-batch-head \
  --policy-arn "arn:${partition}:iam::aws:policy/AmazonEC2FullAccess"
aws iam put-role-policy --role-name hymba-batch-head --policy-name hymba-batch-autoscaler \
  --policy-document "$head_policy"
echo "instance profiles hymba-batch-head and hymba-batch-worker are ready (S3: $*)"
