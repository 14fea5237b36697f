//! Parquet files and Arrow IPC files/streams (`datasets.save_to_disk`) as rows of [`Val`]s.

use std::borrow::Cow;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch, RecordBatchReader};
use arrow_schema::{ArrowError, DataType};

use crate::error::{DatasetError, Result};
use crate::value::Val;

/// Rows per decoded batch.
const BATCH_ROWS: usize = 1024;

/// Column types that could not be converted, reported once per column.
#[derive(Debug, Default)]
pub(crate) struct TypeNotes {
    pub(crate) notes: Vec<String>,
}

impl TypeNotes {
    fn note(&mut self, column: &str, dt: &DataType) {
        let msg =
            format!("column {column:?} has arrow type {dt} which is not read (shown as null)");
        if !self.notes.contains(&msg) {
            self.notes.push(msg);
        }
    }
}

/// Column names of a parquet file, or of an arrow file/stream.
pub(crate) fn schema_columns(reader: &dyn RecordBatchReader) -> Vec<String> {
    reader
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// Opens a parquet file as a batch reader.
pub(crate) fn open_parquet(path: &Path) -> Result<Box<dyn RecordBatchReader + Send>> {
    let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| {
            DatasetError::invalid(
                path,
                None,
                format!("not a readable parquet file: {e}"),
                "check that the file is complete (a truncated parquet file has no footer)",
            )
        })?;
    let reader = builder.with_batch_size(BATCH_ROWS).build().map_err(|e| {
        DatasetError::invalid(
            path,
            None,
            format!("cannot read parquet: {e}"),
            "re-export the file",
        )
    })?;
    Ok(Box::new(reader))
}

/// Opens an arrow IPC stream (what `datasets.save_to_disk` writes) or an arrow IPC file.
pub(crate) fn open_arrow(path: &Path) -> Result<Box<dyn RecordBatchReader + Send>> {
    let mut magic = [0u8; 6];
    {
        use std::io::Read;
        let mut f = File::open(path).map_err(|e| DatasetError::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| DatasetError::io(path, e))?;
        if n == 0 {
            return Err(DatasetError::invalid(
                path,
                None,
                "the arrow file is empty",
                "re-run datasets.save_to_disk",
            ));
        }
    }
    let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let bad = |e: ArrowError| {
        DatasetError::invalid(
            path,
            None,
            format!("not a readable arrow IPC file or stream: {e}"),
            "point at a folder written by datasets.save_to_disk, or re-save it",
        )
    };
    if &magic == b"ARROW1" {
        let r = arrow_ipc::reader::FileReader::try_new(BufReader::new(file), None).map_err(bad)?;
        Ok(Box::new(r))
    } else {
        let r =
            arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None).map_err(bad)?;
        Ok(Box::new(r))
    }
}

/// Converts every row of `batch` into a map `Val`.
pub(crate) fn batch_rows(batch: &RecordBatch, notes: &mut TypeNotes) -> Vec<Val<'static>> {
    let schema = batch.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let mut rows = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let mut m = Vec::with_capacity(names.len());
        for (c, name) in names.iter().enumerate() {
            let v = value_at(batch.column(c).as_ref(), i, name, notes);
            m.push((Cow::Owned((*name).to_string()), v));
        }
        rows.push(Val::Map(m));
    }
    rows
}

fn value_at(a: &dyn Array, i: usize, column: &str, notes: &mut TypeNotes) -> Val<'static> {
    if a.is_null(i) {
        return Val::Null;
    }
    let s = |x: &str| Val::Str(Cow::Owned(x.to_string()));
    match a.data_type() {
        DataType::Null => Val::Null,
        DataType::Boolean => Val::Bool(a.as_boolean().value(i)),
        DataType::Int8 => Val::Int(a.as_primitive::<Int8Type>().value(i).into()),
        DataType::Int16 => Val::Int(a.as_primitive::<Int16Type>().value(i).into()),
        DataType::Int32 => Val::Int(a.as_primitive::<Int32Type>().value(i).into()),
        DataType::Int64 => Val::Int(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => Val::Int(a.as_primitive::<UInt8Type>().value(i).into()),
        DataType::UInt16 => Val::Int(a.as_primitive::<UInt16Type>().value(i).into()),
        DataType::UInt32 => Val::Int(a.as_primitive::<UInt32Type>().value(i).into()),
        DataType::UInt64 => {
            let u = a.as_primitive::<UInt64Type>().value(i);
            i64::try_from(u).map_or(Val::UInt(u), Val::Int)
        }
        DataType::Float32 => Val::Float(a.as_primitive::<Float32Type>().value(i).into()),
        DataType::Float64 => Val::Float(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => s(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => s(a.as_string::<i64>().value(i)),
        DataType::Utf8View => s(a.as_string_view().value(i)),
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref(), column, notes),
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref(), column, notes),
        DataType::FixedSizeList(_, _) => {
            list(a.as_fixed_size_list().value(i).as_ref(), column, notes)
        }
        DataType::Struct(fields) => {
            let st = a.as_struct();
            Val::Map(
                fields
                    .iter()
                    .enumerate()
                    .map(|(c, f)| {
                        (
                            Cow::Owned(f.name().clone()),
                            value_at(st.column(c).as_ref(), i, column, notes),
                        )
                    })
                    .collect(),
            )
        }
        DataType::Dictionary(_, _) => {
            let d = a.as_any_dictionary();
            let keys = d.normalized_keys();
            match keys.get(i) {
                Some(&k) => value_at(d.values().as_ref(), k, column, notes),
                None => Val::Null,
            }
        }
        other => {
            notes.note(column, other);
            Val::Null
        }
    }
}

fn list(values: &dyn Array, column: &str, notes: &mut TypeNotes) -> Val<'static> {
    Val::List(
        (0..values.len())
            .map(|j| value_at(values, j, column, notes))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{Field, Fields, Schema};

    #[test]
    fn converts_strings_ints_and_list_of_structs() {
        let fields = Fields::from(vec![
            Field::new("role", DataType::Utf8, true),
            Field::new("content", DataType::Utf8, true),
        ]);
        let mut lb = ListBuilder::new(StructBuilder::from_fields(fields.clone(), 2));
        {
            let sb = lb.values();
            sb.field_builder::<StringBuilder>(0)
                .unwrap()
                .append_value("user");
            sb.field_builder::<StringBuilder>(1)
                .unwrap()
                .append_value("hi");
            sb.append(true);
        }
        lb.append(true);
        let messages = lb.finish();
        let schema = Schema::new(vec![
            Field::new("text", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("messages", messages.data_type().clone(), true),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec![Some("a")])),
                Arc::new(Int64Array::from(vec![None::<i64>])),
                Arc::new(messages),
            ],
        )
        .unwrap();
        let mut notes = TypeNotes::default();
        let rows = batch_rows(&batch, &mut notes);
        assert_eq!(rows.len(), 1);
        let j = rows[0].to_json();
        assert_eq!(
            j,
            serde_json::json!({"text": "a", "n": null, "messages": [{"role": "user", "content": "hi"}]})
        );
        assert!(notes.notes.is_empty());
    }
}
